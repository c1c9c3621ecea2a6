"""Export open_clip's text tower for the numpy copy in `tower`: read its weights and tokenizer
tables, write them, and prove the copy agrees with open_clip before it is used.

The only part of `query_text` that imports torch, inside its functions: importing the package
stays torch-free.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..text_parts import clip_text_tower
from .tokenizer import UNICODE_SPLIT_TAIL, byte_char, byte_order, pair_key
from .torch_parts import act_name, agrees, f32, layer_norm_params, open_clip_reference, publish
from .tower import BLOCK_KEYS, FORMAT, FORMAT_VERSION, OPTIONAL_BLOCK_KEYS, FastTextTower

# Verification texts: long (> 77 tokens, so truncation keeps EOT last), unicode, html entities,
# emoji, empty, punctuation, a literal special token, and "!~"-style runs whose BPE pieces include
# id 0 (a bare "!"), which is also the padding id.
# All are checked for identical tokens; EMBED_SAMPLES also run through both towers (open_clip pads
# every text to the full context, so each one costs a full forward pass).
SAMPLE_TEXTS = (
    "a photo of a dog running on the beach",
    "",
    "   ",
    "A Photo Of A CAT, sleeping!!!",
    "sunset over the mountains; 4K, HDR... (2023) #travel @friend",
    "Crème brûlée à la française, naïve café",
    "東京の夜景と富士山",
    "Привет, как дела? Ελληνικά κείμενο",
    "emoji 😀🐶🏖️👍🏽 and flags 🇯🇵",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &eacute;t&eacute;",
    "\u201ccurly quotes\u201d \u2014 em dash \ufb01ne ligature ＦＵＬＬ width",
    "don't won't it's we're they've I'm you'll he'd",
    "!!! ??? ... --- *** !?! ¡hola!",
    "!\u00e9 !\u00e9\u00e9 !~ !\u00ab wow!}",
    "<start_of_text> literal special <end_of_text> tokens",
    "tabs\tand\nnewlines\r\nand   spaces",
    "12345 3.14159 1,000,000 ½ ² Ⅻ",
    " ".join(f"word{i} is part of a long caption that will not fit" for i in range(20)),
    "x" * 300,
)
EMBED_SAMPLES = (
    "a photo of a dog running on the beach",
    "",
    "Crème brûlée 東京 Привет emoji 😀🐶 fish &amp; chips &lt;b&gt; “curly” ﬁne",
    "!!! ??? !é ¡hola! <start_of_text> literal <end_of_text> tokens",
    "!~",
    " ".join(f"word{i} is part of a long caption that will not fit" for i in range(20)),
)


def _collect(model) -> tuple[dict | None, dict | None, str | None]:
    """(config, float32 numpy weights, None) or (None, None, reason)."""
    import torch
    from open_clip.transformer import Transformer

    src, why = clip_text_tower(model)
    if src is None:
        return None, None, why
    tf = src.transformer
    if type(tf) is not Transformer:
        return None, None, f"text transformer is {type(tf).__name__}"
    blocks = list(tf.resblocks)
    if not blocks:
        return None, None, "text transformer has no layers"
    width = int(tf.width)
    params = [p for p in tf.parameters()] + [src.token_embedding.weight]
    if any(p.dtype != torch.float32 for p in params):
        return None, None, "text tower weights are not float32 (export from an fp32 model)"
    stacks, shape, why = _stacked_blocks(blocks, width)
    if stacks is None:
        return None, None, why
    lnf = layer_norm_params(src.ln_final, width)
    if lnf is None:
        return None, None, "unsupported final normalisation layer"
    eps = shape["eps"] | {lnf[2]}
    if len(eps) != 1:
        return None, None, "layer norms differ in eps"
    weights = {k: np.ascontiguousarray(np.stack(v)) for k, v in stacks.items() if v}
    weights["token_embedding"] = f32(src.token_embedding.weight)
    weights["positional_embedding"] = f32(src.positional_embedding)
    weights["ln_final_w"] = f32(lnf[0])
    weights["ln_final_b"] = f32(lnf[1])
    dim, why = _projection(src.text_projection, width, weights)
    if dim is None:
        return None, None, why
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "context_length": int(weights["positional_embedding"].shape[0]),
        "vocab_size": int(weights["token_embedding"].shape[0]),
        "width": width,
        "heads": shape["heads"],
        "layers": len(blocks),
        "dim": int(dim),
        "act": shape["act"],
        "ln_eps": eps.pop(),
        "pool": "argmax",
        "weights": sorted(weights),
    }
    return config, weights, None


def _stacked_blocks(blocks, width: int) -> tuple[dict | None, dict | None, str | None]:
    """({weight kind: one array per layer}, {"heads", "act", "eps"}, None) when every layer has
    the same heads, activation and optional parts, else (None, None, reason)."""
    stacks: dict[str, list] = {k: [] for k in BLOCK_KEYS + OPTIONAL_BLOCK_KEYS}
    shapes = []
    for blk in blocks:
        arrays, shape, why = _block_weights(blk, width)
        if arrays is None:
            return None, None, why
        if shapes and shape["heads"] != shapes[0]["heads"]:
            return None, None, "text layers differ in head count"
        shapes.append(shape)
        for key, arr in arrays.items():
            stacks[key].append(arr)
    acts = {s["act"] for s in shapes}
    if None in acts or len(acts) != 1:
        return None, None, "unsupported or mixed activation in the text tower"
    for key in OPTIONAL_BLOCK_KEYS:
        if 0 < len(stacks[key]) < len(blocks):
            return None, None, f"{key} only on some layers"
    eps = {e for s in shapes for e in s["eps"]}
    shape = {"heads": int(shapes[0]["heads"]), "act": acts.pop(), "eps": eps}
    return stacks, shape, None


def _block_weights(blk, width: int) -> tuple[dict | None, dict | None, str | None]:
    """One ResidualAttentionBlock as ({weight kind: array}, {"heads", "act", "eps"}, None), or
    (None, None, reason)."""
    import torch
    from open_clip.transformer import LayerScale, ResidualAttentionBlock

    if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
        return None, None, f"text block type {type(blk).__name__} is not supported"
    attn = blk.attn
    if (
        not isinstance(attn, torch.nn.MultiheadAttention)
        or not attn._qkv_same_embed_dim
        or attn.bias_k is not None
        or attn.add_zero_attn
        or attn.embed_dim != width
    ):
        return None, None, "unsupported attention layer in the text tower"
    mlp = list(blk.mlp.named_children())
    if [n for n, _ in mlp] != ["c_fc", "gelu", "c_proj"]:
        return None, None, "unexpected MLP layout in the text tower"
    c_fc, act, c_proj = (m for _, m in mlp)
    if not isinstance(c_fc, torch.nn.Linear) or not isinstance(c_proj, torch.nn.Linear):
        return None, None, "unexpected MLP layers in the text tower"
    ln1, ln2 = layer_norm_params(blk.ln_1, width), layer_norm_params(blk.ln_2, width)
    if ln1 is None or ln2 is None:
        return None, None, "unsupported normalisation layer in the text tower"
    arrays = {}
    for key, ls in (("ls_1", blk.ls_1), ("ls_2", blk.ls_2)):
        if isinstance(ls, LayerScale):
            arrays[key] = f32(ls.gamma)
        elif not isinstance(ls, torch.nn.Identity):
            return None, None, f"unsupported {key} layer {type(ls).__name__}"

    def bias(linear_bias, size):
        return f32(linear_bias) if linear_bias is not None else np.zeros(size, np.float32)

    arrays.update(
        ln_1_w=f32(ln1[0]),
        ln_1_b=f32(ln1[1]),
        qkv_w=f32(attn.in_proj_weight).T,
        qkv_b=bias(attn.in_proj_bias, 3 * width),
        out_w=f32(attn.out_proj.weight).T,
        out_b=bias(attn.out_proj.bias, width),
        ln_2_w=f32(ln2[0]),
        ln_2_b=f32(ln2[1]),
        fc_w=f32(c_fc.weight).T,
        fc_b=bias(c_fc.bias, c_fc.out_features),
        proj_w=f32(c_proj.weight).T,
        proj_b=bias(c_proj.bias, width),
    )
    shape = {"heads": attn.num_heads, "act": act_name(act), "eps": (ln1[2], ln2[2])}
    return arrays, shape, None


def _projection(proj, width: int, weights: dict) -> tuple[int | None, str | None]:
    """Add the output projection to `weights`; (output dim, None), or (None, reason)."""
    import torch

    if isinstance(proj, torch.nn.Linear):
        weights["text_projection"] = np.ascontiguousarray(f32(proj.weight).T)
        if proj.bias is not None:
            weights["text_projection_b"] = f32(proj.bias)
        return proj.out_features, None
    if isinstance(proj, torch.Tensor) and proj.ndim == 2:
        if proj.dtype != torch.float32:
            return None, "text projection is not float32"
        weights["text_projection"] = f32(proj)
        return proj.shape[1], None
    if proj is None:
        return width, None
    return None, f"unsupported text projection {type(proj).__name__}"


def _tokenizer_tables(
    tokenizer, model_config: dict
) -> tuple[dict | None, np.ndarray | None, str | None]:
    """open_clip's SimpleTokenizer as (config, merges as id pairs), or a reason it is unsupported."""
    from open_clip.tokenizer import SimpleTokenizer

    if not isinstance(tokenizer, SimpleTokenizer):
        return (
            None,
            None,
            f"tokenizer {type(tokenizer).__name__} is not open_clip's SimpleTokenizer",
        )
    if getattr(tokenizer, "reduction_fn", None) is not None:
        return None, None, "tokenizer uses a reduction mask"
    clean = {
        "_clean_lower": "lower",
        "_clean_whitespace": "whitespace",
        "_clean_canonicalize": "canonicalize",
    }.get(getattr(tokenizer.clean_fn, "__name__", ""))
    if clean is None:
        return None, None, "tokenizer has an unknown clean function"
    if tokenizer.context_length != model_config["context_length"]:
        return (
            None,
            None,
            (
                f"tokenizer context {tokenizer.context_length} != model context "
                f"{model_config['context_length']}"
            ),
        )
    enc = tokenizer.encoder
    pairs, why = _merge_pairs(enc, tokenizer.bpe_ranks)
    if pairs is None:
        return None, None, why
    n_regular = 512 + len(pairs)
    specials = {t: i for t, i in enc.items() if i >= n_regular}
    if len(enc) != n_regular + len(specials):
        return None, None, "tokenizer vocabulary has duplicate tokens"
    if max(enc.values()) >= min(65536, model_config["vocab_size"]):
        return None, None, "tokenizer vocabulary is larger than the token embedding"
    if (tokenizer.sot_token_id, tokenizer.eot_token_id) != (
        enc.get("<start_of_text>"),
        enc.get("<end_of_text>"),
    ):
        return None, None, "tokenizer start/end tokens differ from CLIP's"
    # open_clip builds its split pattern from the specials in id order; so does ClipBpeTokenizer.
    ordered = sorted(specials, key=specials.get)
    if getattr(tokenizer.pat, "pattern", None) != "|".join(ordered) + UNICODE_SPLIT_TAIL:
        return None, None, "tokenizer split pattern differs from CLIP's"
    cfg = {
        "kind": "clip-bpe",
        "clean": clean,
        "specials": {t: specials[t] for t in ordered},
        "sot_id": int(tokenizer.sot_token_id),
        "eot_id": int(tokenizer.eot_token_id),
    }
    return cfg, pairs, None


def _merge_pairs(enc: dict, bpe_ranks: dict) -> tuple[np.ndarray | None, str | None]:
    """The BPE merges as (left id, right id) in rank order, checked to build the vocabulary the
    way ClipBpeTokenizer assumes (bytes, bytes + '</w>', then merge r at id 512 + r)."""
    chars = [byte_char(b) for b in byte_order()]
    if [enc.get(c) for c in chars] != list(range(256)) or [
        enc.get(c + "</w>") for c in chars
    ] != list(range(256, 512)):
        return None, "tokenizer vocabulary does not start with the byte table"
    merges = sorted(bpe_ranks, key=bpe_ranks.get)
    pairs = np.zeros((len(merges), 2), dtype=np.int32)
    for r, (a, b) in enumerate(merges):
        ia, ib = enc.get(a), enc.get(b)
        if ia is None or ib is None or enc.get(a + b) != 512 + r:
            return None, "tokenizer merges do not map onto its vocabulary"
        pairs[r] = (ia, ib)
    return pairs, None


def unsupported_reason(model, tokenizer) -> str | None:
    """Why `export_fast_text` would refuse this model/tokenizer, or None if it is supported."""
    config, _, why = _collect(model)
    if config is None:
        return why
    _, _, why = _tokenizer_tables(tokenizer, config)
    return why


def _verify(model, tokenizer, out_dir: Path) -> bool:
    tokens, embed = open_clip_reference(model, tokenizer)
    return agrees(FastTextTower.load(out_dir), SAMPLE_TEXTS, EMBED_SAMPLES, tokens, embed)


def export_fast_text(model, tokenizer, out_dir: Path) -> bool:
    """Write a torch-free copy of the text tower to out_dir (config.json, the BPE merge table, one
    .npy per weight kind) and verify it against open_clip on SAMPLE_TEXTS: identical tokens and
    normalised embeddings within 1e-4 (EMBED_SAMPLES).

    Returns False if the architecture or tokenizer is unsupported (`unsupported_reason` says why)
    or verification fails; out_dir then does not exist (a stale earlier export is removed so it is
    never used). Written to a temp dir beside out_dir and renamed into place.
    """
    config, weights, why = _collect(model)
    tok_cfg, pairs, why = _tokenizer_tables(tokenizer, config) if config else (None, None, why)
    if config is None or tok_cfg is None:
        shutil.rmtree(out_dir, ignore_errors=True)
        return False
    config["tokenizer"] = tok_cfg
    keys = pair_key(pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64))
    order = np.argsort(keys, kind="stable")
    weights["bpe_pair_keys"] = keys[order]
    weights["bpe_pair_ranks"] = order.astype(np.int32)
    return publish(out_dir, config, weights, {}, lambda tmp: _verify(model, tokenizer, tmp))
