"""Export an encoder-only Hugging Face text tower for the numpy copy in `hf_tower`: read the
transformer, pooling and projection head from torch modules and the `tokenizers` pipeline from the
fast tokenizer, write them, and prove the copy agrees with the torch original before it is used.

`export_hf_text_tower` takes the parts (a transformers model, its tokenizer, a pooling name, a
projection module), for any caller (a sentence-transformers query tower; `open_clip_export` reads
them from an open_clip model whose text tower is an HFTextEncoder).
torch is imported inside the functions only.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .export import EMBED_SAMPLES, SAMPLE_TEXTS
from .hf_tower import HF_BLOCK_KEYS, HF_FORMAT, HF_FORMAT_VERSION, HFFastTextTower
from .tokenizer import clean_text
from .torch_parts import act_name, agrees, f32, layer_norm_params, publish

# Literal special tokens of the usual families, checked for identical tokens too.
HF_SAMPLE_TEXTS = (
    *SAMPLE_TEXTS,
    "[CLS] [SEP] [PAD] [MASK] [UNK] <s> </s> <pad> <mask> <unk> ▁ ##ing",
    "ÀÉÎÕÜ àéîõü ß Å ñ ç ø œ Ø İstanbul Ελλάδα",
    "中文句子没有空格，还有标点。한국어 문장 ไทย हिन्दी",
)
POOLINGS = ("mean", "cls", "cls_pooler", "max", "last")


def _bias(linear) -> np.ndarray:
    return (
        f32(linear.bias) if linear.bias is not None else np.zeros(linear.out_features, np.float32)
    )


def _layer_parts(layer, width: int) -> tuple[dict | None, str | None]:
    """One BERT-style layer as its modules ({"q", "k", "v", "out", "fc", "act", "proj", "ln_1",
    "ln_2", "norm"}), or (None, why). Post-LN (BERT/RoBERTa/XLM-R) norms sit in the outputs,
    pre-LN (RoBERTa-PreLayerNorm) norms in the attention and intermediate modules."""
    import torch

    att, mid, out = (getattr(layer, n, None) for n in ("attention", "intermediate", "output"))
    sa = getattr(att, "self", None)
    if any(m is None for m in (att, mid, out, sa)) or getattr(layer, "crossattention", None):
        return None, f"text layer {type(layer).__name__} is not a BERT-style encoder layer"
    parts = {
        "q": getattr(sa, "query", None),
        "k": getattr(sa, "key", None),
        "v": getattr(sa, "value", None),
        "out": getattr(att.output, "dense", None),
        "fc": getattr(mid, "dense", None),
        "proj": getattr(out, "dense", None),
        "act": getattr(mid, "intermediate_act_fn", None),
    }
    if not all(isinstance(parts[k], torch.nn.Linear) for k in ("q", "k", "v", "out", "fc", "proj")):
        return None, "unexpected linear layers in the text tower"
    pre = hasattr(att, "LayerNorm") and hasattr(mid, "LayerNorm")
    norms = (att.LayerNorm, mid.LayerNorm) if pre else (
        getattr(att.output, "LayerNorm", None), getattr(out, "LayerNorm", None)
    )  # fmt: skip
    parts["ln_1"], parts["ln_2"] = (layer_norm_params(ln, width) for ln in norms)
    parts["norm"] = "pre" if pre else "post"
    if parts["ln_1"] is None or parts["ln_2"] is None:
        return None, "unsupported normalisation layer in the text tower"
    heads = getattr(sa, "num_attention_heads", None)
    hd = getattr(sa, "attention_head_size", None)
    if not heads or hd is None or heads * hd != width or parts["q"].out_features != width:
        return None, "unexpected attention shape in the text tower"
    if abs(getattr(sa, "scaling", hd**-0.5) - hd**-0.5) > 1e-9:
        return None, "attention scaling is not 1/sqrt(head size)"
    parts["heads"] = int(heads)
    return parts, None


def _not_bert_style(hf_model) -> str | None:
    """Why the model's layout is not the encoder this exporter reads, or None when it is."""
    import torch

    cfg = getattr(hf_model, "config", None)
    emb, enc = getattr(hf_model, "embeddings", None), getattr(hf_model, "encoder", None)
    if cfg is None or emb is None or not list(getattr(enc, "layer", None) or []):
        return f"{type(hf_model).__name__} is not a BERT-style encoder"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "the text transformer is a decoder"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"position embeddings {cfg.position_embedding_type!r}"
    size = getattr(cfg, "embedding_size", None)
    if hasattr(hf_model, "embeddings_project") or size not in (
        None,
        getattr(cfg, "hidden_size", None),
    ):
        return "factorised embeddings (ELECTRA/ALBERT style)"
    if any(p.dtype != torch.float32 for p in hf_model.parameters()):
        return "text tower weights are not float32 (export from an fp32 model)"
    return None


def _encoder_weights(hf_model) -> tuple[dict | None, dict | None, str | None]:
    """(config, float32 weights, None) for the transformer, or (None, None, why)."""
    import torch

    why = _not_bert_style(hf_model)
    if why is not None:
        return None, None, why
    cfg, emb = hf_model.config, hf_model.embeddings
    layers = list(hf_model.encoder.layer)
    word, pos = emb.word_embeddings, getattr(emb, "position_embeddings", None)
    if not isinstance(word, torch.nn.Embedding) or not isinstance(pos, torch.nn.Embedding):
        return None, None, "unsupported text embeddings"
    width, pad = int(word.embedding_dim), cfg.pad_token_id
    if pad is None:
        return None, None, "the text model has no pad token id"
    after_padding = hasattr(emb, "create_position_ids_from_input_ids")
    if after_padding and getattr(emb, "padding_idx", pad) != pad:
        return None, None, "position padding index differs from the pad token id"
    stacks: dict[str, list] = {k: [] for k in HF_BLOCK_KEYS}
    kinds, eps = set(), set()
    for layer in layers:
        parts, why = _layer_parts(layer, width)
        if parts is None:
            return None, None, why
        _stack_layer(parts, stacks)
        kinds.add((parts["heads"], act_name(parts["act"]), parts["norm"]))
        eps |= {parts["ln_1"][2], parts["ln_2"][2]}
    weights = {k: np.ascontiguousarray(np.stack(v)) for k, v in stacks.items()}
    weights["token_embedding"] = f32(word.weight)
    weights["positional_embedding"] = f32(pos.weight)
    types = getattr(emb, "token_type_embeddings", None)
    if isinstance(types, torch.nn.Embedding):  # token type 0: one text, no pair
        weights["type_embedding"] = f32(types.weight[0])
    for name, ln in (
        ("emb_ln", getattr(emb, "LayerNorm", None)),
        ("ln_final", _final_norm(hf_model)),
    ):
        params = layer_norm_params(ln, width) if ln is not None else None
        if params is not None:
            weights[f"{name}_w"], weights[f"{name}_b"] = f32(params[0]), f32(params[1])
            eps.add(params[2])
    if len(kinds) != 1 or next(iter(kinds))[1] is None:
        return None, None, "unsupported or mixed activation, heads or norms in the text layers"
    if len(eps) != 1:
        return None, None, "layer norms differ in eps"
    heads, act, norm = kinds.pop()
    config = {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "model_type": getattr(cfg, "model_type", None),
        "vocab_size": int(word.num_embeddings),
        "width": width,
        "heads": heads,
        "layers": len(layers),
        "act": act,
        "ln_eps": eps.pop(),
        "norm": norm,
        "positions": "after_padding" if after_padding else "absolute",
        "max_positions": int(pos.num_embeddings),
        "pad_token_id": int(pad),
    }
    return config, weights, None


def _final_norm(hf_model):
    """A pre-LN model's norm after the last layer (RoBERTa-PreLayerNorm keeps it on the model)."""
    own = getattr(hf_model, "LayerNorm", None)
    return own if own is not None else getattr(hf_model.encoder, "LayerNorm", None)


def _stack_layer(parts: dict, stacks: dict) -> None:
    qkv = [parts[k] for k in ("q", "k", "v")]
    stacks["qkv_w"].append(np.concatenate([f32(m.weight).T for m in qkv], axis=1))
    stacks["qkv_b"].append(np.concatenate([_bias(m) for m in qkv]))
    for key in ("out", "fc", "proj"):
        stacks[f"{key}_w"].append(f32(parts[key].weight).T)
        stacks[f"{key}_b"].append(_bias(parts[key]))
    for key in ("ln_1", "ln_2"):
        stacks[f"{key}_w"].append(f32(parts[key][0]))
        stacks[f"{key}_b"].append(f32(parts[key][1]))


def _head(projection, width: int, weights: dict) -> tuple[list | None, int, str | None]:
    """The projection as steps for `HFFastTextTower` (weights added), its output dim, or why not.
    Takes None, nn.Identity, nn.Linear, an activation, a sentence-transformers Dense (`linear` +
    `activation_function`), a sentence-transformers Normalize (one inside the head, as in a
    normalising student with a Dense layer distilled onto it), or an nn.Sequential / list of
    these."""
    import torch

    steps, dim = [], width
    todo = [projection] if projection is not None else []
    while todo:
        m = todo.pop(0)
        if isinstance(m, (torch.nn.Sequential, list, tuple)):
            todo[:0] = list(m)
        elif hasattr(m, "linear") and hasattr(m, "activation_function"):
            todo[:0] = [m.linear, m.activation_function]
        elif isinstance(m, torch.nn.Linear):
            if m.in_features != dim:
                return None, 0, "projection layers do not chain"
            i = len(steps)
            weights[f"head_{i}_w"] = np.ascontiguousarray(f32(m.weight).T)
            if m.bias is not None:
                weights[f"head_{i}_b"] = f32(m.bias)
            b = f"head_{i}_b" if m.bias is not None else None
            steps.append({"op": "linear", "w": f"head_{i}_w", "b": b})
            dim = m.out_features
        elif type(m).__name__ == "Normalize":
            if todo:  # the final one is left out: Tower.embed normalises too
                steps.append({"op": "normalize"})
        elif act_name(m) is not None:
            if act_name(m) != "identity":
                steps.append({"op": "act", "act": act_name(m)})
        else:
            return None, 0, f"unsupported projection layer {type(m).__name__}"
    return steps, dim, None


def _collect(hf_model, tokenizer, pooling, projection, context_length):
    """(config, weights, tokenizer JSON, None) or (None, None, None, why)."""
    config, weights, why = _encoder_weights(hf_model)
    if config is None:
        return None, None, None, why
    if pooling not in POOLINGS:
        return None, None, None, f"text pooling {pooling!r} (supported: {', '.join(POOLINGS)})"
    config["pool"] = "cls" if pooling == "cls_pooler" else pooling
    if pooling == "cls_pooler":
        pooler = getattr(hf_model, "pooler", None)
        dense, act = getattr(pooler, "dense", None), getattr(pooler, "activation", None)
        if dense is None or act_name(act) is None:
            return None, None, None, "cls_pooler pooling without the model's dense pooler"
        weights["pooler_w"], weights["pooler_b"] = f32(dense.weight).T.copy(), _bias(dense)
        config["pooler_act"] = act_name(act)
    steps, dim, why = _head(projection, config["width"], weights)
    if steps is None:
        return None, None, None, why
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None, None, None, "tokenizer is not a fast (tokenizers-backed) tokenizer"
    if getattr(tokenizer, "pad_token_id", None) is None:
        return None, None, None, "tokenizer has no pad token"
    offset = config["pad_token_id"] + 1 if config["positions"] == "after_padding" else 0
    if context_length + offset > config["max_positions"]:
        return None, None, None, "context length exceeds the position embeddings"
    config.update(head=steps, dim=int(dim), context_length=int(context_length))
    config["weights"] = sorted(weights)
    return config, weights, backend.to_str(), None


def export_hf_text_tower(
    hf_model,
    tokenizer,
    out_dir: Path,
    *,
    pooling: str,
    projection=None,
    context_length: int,
    clean: str | None = None,
    strip_sep_token: bool = False,
    reference_tokens: Callable[[list[str]], np.ndarray] | None = None,
    reference_embed: Callable[[list[str]], np.ndarray] | None = None,
) -> bool:
    """Write a torch-free copy of a Hugging Face encoder text tower to out_dir and verify it.

    hf_model: the transformers encoder (BertModel, RobertaModel, XLMRobertaModel, a MiniLM...;
    post-LN, or RoBERTa-PreLayerNorm's pre-LN), fp32. tokenizer: its transformers fast tokenizer.
    pooling: "mean", "cls" (first token), "cls_pooler" (first token through the model's own
    dense+tanh pooler), "max" or "last" (last real token). projection: the head after pooling
    (see `_head`). context_length: what texts are truncated to, special tokens included. clean:
    open_clip's clean mode applied before tokenizing, or None. reference_tokens / reference_embed:
    the original's (n, context_length) padded token ids and (n, dim) embeddings of a list of
    texts; by default computed from the parts, as `hf_model` + pooling + projection in torch.

    Returns False (out_dir then does not exist) if something is unsupported or the copy disagrees:
    tokens not identical on HF_SAMPLE_TEXTS, or normalised embeddings further than 1e-4.
    """
    config, weights, tok_json, _ = _collect(
        hf_model, tokenizer, pooling, projection, context_length
    )
    if config is None:
        shutil.rmtree(out_dir, ignore_errors=True)
        return False
    sep = getattr(tokenizer, "sep_token_id", None) if strip_sep_token else None
    config["tokenizer"] = {
        "kind": "hf-tokenizers",
        "clean": clean,
        "pad_id": int(tokenizer.pad_token_id),
        "strip_sep_id": sep,
    }
    ref = _TorchReference(hf_model, tokenizer, pooling, projection, config)
    tokens_fn = reference_tokens or ref.tokens
    embed_fn = reference_embed or ref.embed

    def verify(tmp: Path) -> bool:
        tower = HFFastTextTower.load(tmp)
        return agrees(tower, HF_SAMPLE_TEXTS, EMBED_SAMPLES, tokens_fn, embed_fn)

    return publish(Path(out_dir), config, weights, {"tokenizer.json": tok_json}, verify)


def hf_unsupported_reason(hf_model, tokenizer, pooling: str, projection=None, context_length=0):
    """Why `export_hf_text_tower` would refuse these parts, or None if they are supported."""
    return _collect(hf_model, tokenizer, pooling, projection, context_length)[3]


class _TorchReference:
    """The tower in torch from its parts: the transformers tokenizer called as open_clip's
    HFTokenizer calls it, the model with its padding mask, pooling, projection."""

    def __init__(self, hf_model, tokenizer, pooling, projection, config):
        self.model, self.tokenizer, self.pooling = hf_model, tokenizer, pooling
        self.projection, self.config = projection, config

    def tokens(self, texts: list[str]) -> np.ndarray:
        cfg = self.config["tokenizer"]
        if cfg["clean"]:
            texts = [clean_text(t, cfg["clean"]) for t in texts]
        ids = self.tokenizer(
            texts, max_length=self.config["context_length"], padding="max_length", truncation=True
        )["input_ids"]
        ids = np.array(ids, dtype=np.int64)
        if cfg["strip_sep_id"] is not None:
            ids[ids == cfg["strip_sep_id"]] = 0
        return ids

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        ids = torch.from_numpy(self.tokens(texts))
        mask = (ids != self.config["pad_token_id"]).long()
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask)
            x, m = out.last_hidden_state, mask.unsqueeze(-1).float()
            if self.pooling == "mean":
                x = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            elif self.pooling == "max":
                x = x.masked_fill(m == 0, float("-inf")).max(1).values
            elif self.pooling == "last":
                x = x[torch.arange(len(x)), mask.sum(1) - 1]
            else:
                x = out.pooler_output if self.pooling == "cls_pooler" else x[:, 0]
            for step in _modules(self.projection):
                x = step(x)
        return x.float().numpy()


def _modules(projection) -> list:
    if projection is None:
        return []
    return list(projection) if isinstance(projection, (list, tuple)) else [projection]
