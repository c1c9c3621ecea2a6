"""A torch-free copy of an open_clip text tower, for cold-start queries.

Importing torch and open_clip costs seconds, and a query embeds one short text. This module runs
the same text transformer in numpy, with weights memory-mapped from .npy files (one file per
weight kind, stacked over layers), and tokenizes with a re-implementation of open_clip's
SimpleTokenizer that loads in milliseconds. `export_fast_text` writes the copy and proves it
agrees with open_clip before it is used.

Only stdlib and numpy are imported at module level. ftfy, html and the `regex` module are imported
lazily, and only for texts whose cleaning or splitting needs them (non-ASCII, '&' entities).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .base import Tower, l2_normalize

FORMAT = "mmsearch-fast-text"
FORMAT_VERSION = 1

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


# -- tokenizer --------------------------------------------------------------------------------------


def _byte_order() -> list[int]:
    """Bytes in the order of open_clip's `bytes_to_unicode` (GPT-2's table): a byte's position is
    its BPE id, and 256 + position is its id with the end-of-word suffix."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    return bs + [b for b in range(256) if b not in bs]


def _byte_char(b: int) -> str:
    order = _byte_order()
    i = order.index(b)
    return chr(b) if i < 188 else chr(256 + i - 188)


# Text that ftfy.fix_text and html.unescape leave unchanged: printable ASCII without '&', plus
# tab/CR/LF (which whitespace cleaning turns into single spaces anyway). Checked against ftfy in the
# tests. Such text skips importing ftfy (~100 ms).
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e\t\n\r]*")
_ASCII_SPLIT_TAIL = r"|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\sa-zA-Z0-9]+"
_UNICODE_SPLIT_TAIL = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def pair_key(left, right):
    """One integer per BPE merge pair (token ids are < 65536)."""
    return left * 65536 + right


class ClipBpeTokenizer:
    """open_clip's SimpleTokenizer (clean, regex split, byte-level BPE with '</w>') over token ids.

    `pair_keys` is sorted `pair_key(left_id, right_id)` of every merge and `pair_ranks` their
    ranks; the merge of rank r produces id 512 + r, exactly as SimpleTokenizer builds its
    vocabulary (checked at export).
    """

    # Uncached words looked up with numpy before building a dict of all merges: the dict costs
    # ~20 ms to build, a query needs a few dozen lookups, indexing a text corpus millions.
    DICT_AFTER = 2000

    def __init__(
        self,
        pair_keys: np.ndarray,
        pair_ranks: np.ndarray,
        specials: dict[str, int],
        context_length: int,
        clean: str,
        sot_id: int,
        eot_id: int,
    ):
        self.pair_keys = np.asarray(pair_keys, dtype=np.int64)
        self.pair_ranks = np.asarray(pair_ranks, dtype=np.int64)
        self.rank_of: dict[int, int] | None = None
        self.misses = 0
        self.specials = dict(specials)
        self.context_length = context_length
        self.clean = clean
        self.sot_id, self.eot_id = sot_id, eot_id
        order = _byte_order()
        self.byte_id = [0] * 256
        for i, b in enumerate(order):
            self.byte_id[b] = i
        special = "|".join(specials)
        # open_clip splits with `regex` and IGNORECASE. On ASCII text its classes are exactly these
        # ASCII ones, so the stdlib `re` serves (the `regex` module costs ~25 ms to import).
        self._ascii_pat = re.compile(special + _ASCII_SPLIT_TAIL, re.IGNORECASE)
        self._unicode_pat = None
        self._unicode_src = special + _UNICODE_SPLIT_TAIL
        self.cache: dict[str, list[int]] = {}

    def clean_text(self, text: str) -> str:
        if not _PLAIN.fullmatch(text):
            import html

            import ftfy

            text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        if self.clean == "canonicalize":
            import string

            text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation))
            return " ".join(text.lower().split())
        text = " ".join(text.split())
        return text.lower() if self.clean == "lower" else text

    def _split(self, text: str) -> list[str]:
        if text.isascii():
            return self._ascii_pat.findall(text)
        if self._unicode_pat is None:
            import regex

            self._unicode_pat = regex.compile(self._unicode_src, regex.IGNORECASE)
        return self._unicode_pat.findall(text)

    def _bpe(self, piece: str) -> list[int]:
        # Same loop as SimpleTokenizer.bpe, on ids: string <-> id is a bijection in CLIP's vocab.
        cached = self.cache.get(piece)
        if cached is not None:
            return cached
        special = self.specials.get(piece)
        if special is not None:
            return [special]
        word = [self.byte_id[b] for b in piece.encode("utf-8")]
        word[-1] += 256
        self.misses += 1
        if self.rank_of is None and self.misses > self.DICT_AFTER:
            self.rank_of = dict(zip(self.pair_keys.tolist(), self.pair_ranks.tolist(), strict=True))
        best_pair = self._best_pair_dict if self.rank_of is not None else self._best_pair_np
        while len(word) > 1:
            best = best_pair(word)
            if best is None:
                break
            first, second, rank = best
            merged = 512 + rank
            new_word, i, n = [], 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(merged)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = new_word
        if len(self.cache) < 100_000:
            self.cache[piece] = word
        return word

    def _best_pair_dict(self, word: list[int]) -> tuple[int, int, int] | None:
        best, best_rank, rank_of = None, None, self.rank_of
        for pair in zip(word, word[1:], strict=False):
            r = rank_of.get(pair_key(*pair))
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = pair, r
        return None if best is None else (best[0], best[1], best_rank)

    def _best_pair_np(self, word: list[int]) -> tuple[int, int, int] | None:
        # Distinct pairs have distinct ranks, so the lowest rank names one pair unambiguously
        # (SimpleTokenizer takes min() over the set of pairs).
        w = np.array(word, dtype=np.int64)
        keys = pair_key(w[:-1], w[1:])
        at = np.searchsorted(self.pair_keys, keys)
        at[at == len(self.pair_keys)] = 0
        found = self.pair_keys[at] == keys
        if not found.any():
            return None
        ranks = np.where(found, self.pair_ranks[at], np.iinfo(np.int64).max)
        j = int(ranks.argmin())
        return word[j], word[j + 1], int(ranks[j])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens and without truncation."""
        ids: list[int] = []
        for piece in self._split(self.clean_text(text)):
            ids.extend(self._bpe(piece))
        return ids

    def token_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """[SOT] + ids + [EOT] per text, truncated to the context with EOT kept last."""
        rows = []
        for text in texts:
            row = [self.sot_id, *self.encode(text), self.eot_id]
            if len(row) > self.context_length:
                row = row[: self.context_length]
                row[-1] = self.eot_id
            rows.append(row)
        return rows

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """(n, context_length) int64, zero-padded: what open_clip's tokenizer returns."""
        if isinstance(texts, str):
            texts = [texts]
        rows = self.token_rows(texts)
        out = np.zeros((len(rows), self.context_length), dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out


# -- the numpy tower --------------------------------------------------------------------------------

# Numerical Recipes' erfc (Chebyshev fit, fractional error < 1.2e-7), Horner coefficients from the
# highest power down. numpy has no erf and scipy takes too long to import; computed in float32
# this is as close to math.erf as torch's own float32 GELU (both ~6e-7 abs on [-12, 12]).
_ERFC = (
    0.17087277,
    -0.82215223,
    1.48851587,
    -1.13520398,
    0.27886807,
    -0.18628806,
    0.09678418,
    0.37409196,
    1.00002368,
    -1.26551223,
)


def _gelu(x: np.ndarray) -> np.ndarray:
    u = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = 1 / (1 + np.float32(0.5) * u)
    p = np.full_like(t, _ERFC[0])
    for c in _ERFC[1:]:
        p *= t
        p += np.float32(c)
    p -= u * u
    np.exp(p, out=p)
    p *= t  # erfc(|x| / sqrt 2)
    p *= np.float32(0.5)
    # Phi(x) = 1 - erfc/2 for x >= 0, erfc/2 below: GELU(x) = x * Phi(x)
    phi = np.where(x >= 0, 1 - p, p)
    return x * phi


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflow -> inf -> x / inf = 0, the correct limit
        return x / (1 + np.exp(np.float32(-1.702) * x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = np.float32(math.sqrt(2 / math.pi))
    return np.float32(0.5) * x * (1 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


_ACTS = {"gelu": _gelu, "quick_gelu": _quick_gelu, "gelu_tanh": _gelu_tanh}


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    var = np.mean(d * d, axis=-1, keepdims=True)
    d *= 1 / np.sqrt(var + np.float32(eps))
    d *= w
    d += b
    return d


# Batches up to this many tokens (a few queries) run BLAS on one thread. OpenBLAS threads spin
# while they wait: on a busy 2-core machine a 12-token query took 0.6-3.5 s with 2 threads and
# 0.1-0.3 s with one; on an idle machine one thread is about as fast for work this small.
SMALL_BATCH_TOKENS = 256
_blas_api: list = []  # [(get_num_threads, set_num_threads)] once looked up, [None] if unavailable


def _find_openblas():
    """numpy's OpenBLAS thread controls via ctypes, or None (not Linux, MKL, not found).

    threadpoolctl does this generally but takes ~80 ms to import; the query path cannot afford it.
    """
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split(None, 5)[-1].strip() for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    import ctypes

    for path in sorted(libs, key=lambda p: "numpy" not in p):  # numpy's own copy first
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", "", "64"):
                name = f"{prefix}openblas_%s_num_threads{suffix}"
                get, set_ = getattr(lib, name % "get", None), getattr(lib, name % "set", None)
                if get is not None and set_ is not None:
                    get.restype = ctypes.c_int
                    set_.argtypes = [ctypes.c_int]
                    return get, set_
    return None


@contextlib.contextmanager
def _one_blas_thread():
    if not _blas_api:
        _blas_api.append(_find_openblas())
    api = _blas_api[0]
    if api is None:
        yield
        return
    get, set_ = api
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


# Weight files. Per-layer weights are stacked over layers, so a 12-layer tower is ~17 files
# (np.load costs ~0.1 ms per file). Matrices are stored (in, out) so the forward reads x @ w.
_BLOCK_KEYS = (
    "ln_1_w",
    "ln_1_b",
    "qkv_w",
    "qkv_b",
    "out_w",
    "out_b",
    "ln_2_w",
    "ln_2_b",
    "fc_w",
    "fc_b",
    "proj_w",
    "proj_b",
)
_OPTIONAL_BLOCK_KEYS = ("ls_1", "ls_2")


class FastTextTower(Tower):
    """The open_clip text tower in numpy; load with `FastTextTower.load(dir)`."""

    def __init__(self, config: dict, weights: dict[str, np.ndarray], tokenizer: ClipBpeTokenizer):
        self.config = config
        self.w = weights
        self.tokenizer = tokenizer
        self.context_length = int(config["context_length"])
        self.dim = int(config["dim"])
        self.width = int(config["width"])
        self.heads = int(config["heads"])
        self.layers = int(config["layers"])
        self.eps = float(config["ln_eps"])
        self.act = _ACTS[config["act"]]

    @classmethod
    def load(cls, out_dir: Path) -> FastTextTower:
        """Open an export written by `export_fast_text` (memory-mapped; imports no torch)."""
        out_dir = Path(out_dir)
        try:
            config = json.loads((out_dir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"no fast text tower in {out_dir}: {e}") from e
        if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
            raise ModelError(
                f"{out_dir} holds fast-text format {config.get('format')!r} "
                f"v{config.get('format_version')}, expected {FORMAT!r} v{FORMAT_VERSION}"
            )
        try:
            weights = {
                name: np.asarray(np.load(out_dir / f"{name}.npy", mmap_mode="r"))
                for name in config["weights"]
            }
            tok = config["tokenizer"]
            pair_keys = np.load(out_dir / "bpe_pair_keys.npy")
            pair_ranks = np.load(out_dir / "bpe_pair_ranks.npy")
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"fast text tower in {out_dir} is incomplete: {e}") from e
        tokenizer = ClipBpeTokenizer(
            pair_keys,
            pair_ranks,
            tok["specials"],
            int(config["context_length"]),
            tok["clean"],
            int(tok["sot_id"]),
            int(tok["eot_id"]),
        )
        return cls(config, weights, tokenizer)

    def count_tokens(self, text: str) -> int:
        """Tokens the text occupies, without start/end tokens."""
        return len(self.tokenizer.encode(text))

    def embed_batch(self, batch: Sequence[str]) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = self.tokenizer.token_rows(list(batch))
        # Causal attention plus pooling at the EOT position make every position after the pooled
        # one irrelevant, so the batch is cut to its longest row instead of the full context.
        length = max(len(r) for r in rows)
        ids = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        # open_clip pools at argmax(token id) (first maximum), which is EOT unless the text holds a
        # literal special token; numpy's argmax also returns the first maximum.
        limit = _one_blas_thread() if ids.size <= SMALL_BATCH_TOKENS else contextlib.nullcontext()
        with limit:
            return self._forward(ids, ids.argmax(axis=1))

    def _forward(self, ids: np.ndarray, pool: np.ndarray) -> np.ndarray:
        w, eps, act = self.w, self.eps, self.act
        n, length = ids.shape
        width, heads = self.width, self.heads
        hd = width // heads
        rows = np.arange(n)
        x = w["token_embedding"][ids] + w["positional_embedding"][:length]
        x = x.reshape(n * length, width).astype(np.float32, copy=False)
        mask = np.triu(np.full((length, length), -np.inf, dtype=np.float32), 1)
        scale = np.float32(1 / math.sqrt(hd))

        def split_heads(t: np.ndarray) -> np.ndarray:  # (n*L, W) -> (n, H, L, hd)
            return t.reshape(n, -1, heads, hd).transpose(0, 2, 1, 3)

        for i in range(self.layers):
            h = _layer_norm(x, w["ln_1_w"][i], w["ln_1_b"][i], eps)
            qkv_w, qkv_b = w["qkv_w"][i], w["qkv_b"][i]
            kv = h @ qkv_w[:, width:]
            kv += qkv_b[width:]
            k, v = split_heads(kv[:, :width]), split_heads(kv[:, width:])
            if i < self.layers - 1:
                q, m = split_heads(h @ qkv_w[:, :width] + qkv_b[:width]), mask
            else:
                # Only the pooled token reaches the output, so the last layer runs its query,
                # residual stream and MLP for that row alone (attending to all keys before it).
                h = h.reshape(n, length, width)[rows, pool]
                q = (h @ qkv_w[:, :width] + qkv_b[:width]).reshape(n, heads, 1, hd)
                m = mask[pool][:, None, None, :]
                x = x.reshape(n, length, width)[rows, pool]
            s = (q * scale) @ k.transpose(0, 1, 3, 2)
            s += m
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            a = (s @ v).transpose(0, 2, 1, 3).reshape(x.shape)
            a = a @ w["out_w"][i]
            a += w["out_b"][i]
            if "ls_1" in w:
                a *= w["ls_1"][i]
            x = x + a
            h = _layer_norm(x, w["ln_2_w"][i], w["ln_2_b"][i], eps)
            h = h @ w["fc_w"][i]
            h += w["fc_b"][i]
            h = act(h)
            h = h @ w["proj_w"][i]
            h += w["proj_b"][i]
            if "ls_2" in w:
                h *= w["ls_2"][i]
            x = x + h
        # x is now the pooled rows; ln_final is per token, so normalising after pooling is exact.
        x = _layer_norm(x, w["ln_final_w"], w["ln_final_b"], eps)
        if "text_projection" in w:
            x = x @ w["text_projection"]
            if "text_projection_b" in w:
                x = x + w["text_projection_b"]
        return np.ascontiguousarray(x, dtype=np.float32)


# -- export (the only part that imports torch) ------------------------------------------------------


def _text_parts(model) -> tuple[dict | None, str | None]:
    """The text tower's modules and settings, or (None, why it is unsupported)."""
    import torch
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):
        src = model
        parts = {"pool_type": model.text_pool_type, "cls_emb": None, "use_pad_mask": False}
    elif isinstance(model, CustomTextCLIP):
        src = model.text
        if not isinstance(src, TextTransformer):
            return None, f"text tower is {type(src).__name__}, not open_clip's TextTransformer"
        parts = {
            "pool_type": src.pool_type,
            "cls_emb": src.cls_emb,
            "use_pad_mask": getattr(src, "use_pad_mask", False),
        }
    else:
        return None, f"{type(model).__name__} is not an open_clip CLIP model"
    for name in (
        "token_embedding",
        "positional_embedding",
        "transformer",
        "ln_final",
        "text_projection",
        "attn_mask",
    ):
        parts[name] = getattr(src, name, None)
    if parts["pool_type"] != "argmax":
        return None, f"text pooling {parts['pool_type']!r} (only 'argmax' is supported)"
    if parts["cls_emb"] is not None or parts["use_pad_mask"]:
        return None, "text tower with a class token or padding mask"
    mask = parts["attn_mask"]
    if not isinstance(mask, torch.Tensor):
        return None, "text tower without a causal attention mask"
    n_pos = mask.shape[0]
    causal = torch.full((n_pos, n_pos), float("-inf")).triu_(1)
    if mask.shape != causal.shape or not torch.equal(mask.float().cpu(), causal):
        return None, "text attention mask is not causal"
    if not isinstance(parts["token_embedding"], torch.nn.Embedding):
        return None, "token embedding is not an nn.Embedding"
    return parts, None


def _layer_norm_params(ln, width: int):
    import torch

    if not isinstance(ln, torch.nn.LayerNorm) or tuple(ln.normalized_shape) != (width,):
        return None
    if ln.weight is None:
        return None
    bias = ln.bias if ln.bias is not None else torch.zeros(width)
    return ln.weight, bias, float(ln.eps)


def _act_name(act) -> str | None:
    import torch
    from open_clip.transformer import QuickGELU

    if type(act) is QuickGELU:
        return "quick_gelu"
    if type(act) is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return None


def _collect(model) -> tuple[dict | None, dict | None, str | None]:
    """(config, float32 numpy weights, None) or (None, None, reason)."""
    import torch
    from open_clip.transformer import LayerScale, ResidualAttentionBlock, Transformer

    parts, why = _text_parts(model)
    if parts is None:
        return None, None, why
    tf = parts["transformer"]
    if type(tf) is not Transformer:
        return None, None, f"text transformer is {type(tf).__name__}"
    blocks = list(tf.resblocks)
    if not blocks:
        return None, None, "text transformer has no layers"
    width = int(tf.width)
    params = [p for p in tf.parameters()] + [parts["token_embedding"].weight]
    if any(p.dtype != torch.float32 for p in params):
        return None, None, "text tower weights are not float32 (export from an fp32 model)"

    def f32(t) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy().copy()

    acts, eps_set, stacks = set(), set(), {k: [] for k in _BLOCK_KEYS + _OPTIONAL_BLOCK_KEYS}
    heads = None
    for blk in blocks:
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
        if heads not in (None, attn.num_heads):
            return None, None, "text layers differ in head count"
        heads = attn.num_heads
        mlp = list(blk.mlp.named_children())
        if [n for n, _ in mlp] != ["c_fc", "gelu", "c_proj"]:
            return None, None, "unexpected MLP layout in the text tower"
        c_fc, act, c_proj = (m for _, m in mlp)
        if not isinstance(c_fc, torch.nn.Linear) or not isinstance(c_proj, torch.nn.Linear):
            return None, None, "unexpected MLP layers in the text tower"
        acts.add(_act_name(act))
        ln1, ln2 = _layer_norm_params(blk.ln_1, width), _layer_norm_params(blk.ln_2, width)
        if ln1 is None or ln2 is None:
            return None, None, "unsupported normalisation layer in the text tower"
        eps_set.update((ln1[2], ln2[2]))
        for key, ls in (("ls_1", blk.ls_1), ("ls_2", blk.ls_2)):
            if isinstance(ls, LayerScale):
                stacks[key].append(f32(ls.gamma))
            elif not isinstance(ls, torch.nn.Identity):
                return None, None, f"unsupported {key} layer {type(ls).__name__}"

        def bias(linear_bias, size):
            return f32(linear_bias) if linear_bias is not None else np.zeros(size, np.float32)

        stacks["ln_1_w"].append(f32(ln1[0]))
        stacks["ln_1_b"].append(f32(ln1[1]))
        stacks["qkv_w"].append(f32(attn.in_proj_weight).T)
        stacks["qkv_b"].append(bias(attn.in_proj_bias, 3 * width))
        stacks["out_w"].append(f32(attn.out_proj.weight).T)
        stacks["out_b"].append(bias(attn.out_proj.bias, width))
        stacks["ln_2_w"].append(f32(ln2[0]))
        stacks["ln_2_b"].append(f32(ln2[1]))
        stacks["fc_w"].append(f32(c_fc.weight).T)
        stacks["fc_b"].append(bias(c_fc.bias, c_fc.out_features))
        stacks["proj_w"].append(f32(c_proj.weight).T)
        stacks["proj_b"].append(bias(c_proj.bias, width))
    if None in acts or len(acts) != 1:
        return None, None, "unsupported or mixed activation in the text tower"
    for key in _OPTIONAL_BLOCK_KEYS:
        if 0 < len(stacks[key]) < len(blocks):
            return None, None, f"{key} only on some layers"
    lnf = _layer_norm_params(parts["ln_final"], width)
    if lnf is None:
        return None, None, "unsupported final normalisation layer"
    eps_set.add(lnf[2])
    if len(eps_set) != 1:
        return None, None, "layer norms differ in eps"

    weights = {k: np.ascontiguousarray(np.stack(v)) for k, v in stacks.items() if v}
    weights["token_embedding"] = f32(parts["token_embedding"].weight)
    weights["positional_embedding"] = f32(parts["positional_embedding"])
    weights["ln_final_w"] = f32(lnf[0])
    weights["ln_final_b"] = f32(lnf[1])
    proj = parts["text_projection"]
    if isinstance(proj, torch.nn.Linear):
        weights["text_projection"] = np.ascontiguousarray(f32(proj.weight).T)
        if proj.bias is not None:
            weights["text_projection_b"] = f32(proj.bias)
        dim = proj.out_features
    elif isinstance(proj, torch.Tensor) and proj.ndim == 2:
        if proj.dtype != torch.float32:
            return None, None, "text projection is not float32"
        weights["text_projection"] = f32(proj)
        dim = proj.shape[1]
    elif proj is None:
        dim = width
    else:
        return None, None, f"unsupported text projection {type(proj).__name__}"
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "context_length": int(weights["positional_embedding"].shape[0]),
        "vocab_size": int(weights["token_embedding"].shape[0]),
        "width": width,
        "heads": int(heads),
        "layers": len(blocks),
        "dim": int(dim),
        "act": acts.pop(),
        "ln_eps": eps_set.pop(),
        "pool": "argmax",
        "weights": sorted(weights),
    }
    return config, weights, None


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
    order = _byte_order()
    chars = [_byte_char(b) for b in order]
    if [enc.get(c) for c in chars] != list(range(256)) or [
        enc.get(c + "</w>") for c in chars
    ] != list(range(256, 512)):
        return None, None, "tokenizer vocabulary does not start with the byte table"
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    pairs = np.zeros((len(merges), 2), dtype=np.int32)
    for r, (a, b) in enumerate(merges):
        ia, ib = enc.get(a), enc.get(b)
        if ia is None or ib is None or enc.get(a + b) != 512 + r:
            return None, None, "tokenizer merges do not map onto its vocabulary"
        pairs[r] = (ia, ib)
    n_regular = 512 + len(merges)
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
    if getattr(tokenizer.pat, "pattern", None) != "|".join(ordered) + _UNICODE_SPLIT_TAIL:
        return None, None, "tokenizer split pattern differs from CLIP's"
    cfg = {
        "kind": "clip-bpe",
        "clean": clean,
        "specials": {t: specials[t] for t in ordered},
        "sot_id": int(tokenizer.sot_token_id),
        "eot_id": int(tokenizer.eot_token_id),
    }
    return cfg, pairs, None


def unsupported_reason(model, tokenizer) -> str | None:
    """Why `export_fast_text` would refuse this model/tokenizer, or None if it is supported."""
    config, _, why = _collect(model)
    if config is None:
        return why
    _, _, why = _tokenizer_tables(tokenizer, config)
    return why


def _verify(model, tokenizer, out_dir: Path) -> bool:
    import torch

    tower = FastTextTower.load(out_dir)
    ref_tokens = tokenizer(list(SAMPLE_TEXTS))
    if not np.array_equal(ref_tokens.cpu().numpy(), tower.tokenizer(SAMPLE_TEXTS)):
        return False
    texts = list(EMBED_SAMPLES)
    device = next(model.parameters()).device
    with torch.inference_mode():
        ref = model.encode_text(tokenizer(texts).to(device), normalize=True)
    ref = ref.float().cpu().numpy()
    got = l2_normalize(tower.embed_batch(texts))
    # One at a time too: a single query (no padding in the batch) is the common case.
    one = l2_normalize(np.concatenate([tower.embed_batch([t]) for t in texts[:-1]]))
    return (
        got.shape == ref.shape
        and bool(np.isfinite(got).all())
        and float(np.abs(got - ref).max()) <= 1e-4
        and float(np.abs(one - ref[:-1]).max()) <= 1e-4
    )


def export_fast_text(model, tokenizer, out_dir: Path) -> bool:
    """Write a torch-free copy of the text tower to out_dir (config.json, the BPE merge table, one
    .npy per weight kind) and verify it against open_clip on SAMPLE_TEXTS: identical tokens and
    normalised embeddings within 1e-4 (EMBED_SAMPLES).

    Returns False if the architecture or tokenizer is unsupported (`unsupported_reason` says why)
    or verification fails; out_dir then does not exist (a stale earlier export is removed so it is
    never used). Written to a temp dir beside out_dir and renamed into place.
    """
    out_dir = Path(out_dir)
    config, weights, why = _collect(model)
    tok_cfg, pairs, why = _tokenizer_tables(tokenizer, config) if config else (None, None, why)
    if config is None or tok_cfg is None:
        shutil.rmtree(out_dir, ignore_errors=True)
        return False
    config["tokenizer"] = tok_cfg
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        for name, arr in weights.items():
            np.save(tmp / f"{name}.npy", arr)
        keys = pair_key(pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64))
        order = np.argsort(keys, kind="stable")
        np.save(tmp / "bpe_pair_keys.npy", keys[order])
        np.save(tmp / "bpe_pair_ranks.npy", order.astype(np.int32))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        try:
            ok = _verify(model, tokenizer, tmp)
        except Exception:  # an export that cannot even run the samples is a failed export
            ok = False
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            return False
        # A directory cannot be atomically replaced by rename, so move the old one aside first.
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
