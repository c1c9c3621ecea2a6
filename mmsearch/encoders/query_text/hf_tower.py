"""An encoder-only Hugging Face text tower in numpy (BERT, RoBERTa, XLM-R, MiniLM...): embeddings,
post- or pre-LN blocks, padding-masked attention, pooling and a projection head. Loads an export
written by `query_text.hf_export` (weights memory-mapped from .npy files stacked over layers, the
`tokenizers` pipeline as tokenizer.json).

Only stdlib and numpy are imported here; `tokenizers` when the tokenizer is loaded. No torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ModelError
from .hf_tokenizer import HFTextTokenizer
from .numpy_ops import (
    ACTIVATIONS,
    attend,
    layer_norm,
    linear,
    split_heads,
)
from .tower import NumpyTextTower

HF_FORMAT = "mmsearch-fast-text-hf"
HF_FORMAT_VERSION = 1

# Per-layer weights, stacked over layers, matrices stored (in, out). q, k and v are one matrix.
# Post-LN (BERT): ln_1 normalises after the attention residual, ln_2 after the MLP residual.
# Pre-LN: ln_1 before attention, ln_2 before the MLP, and ln_final after the last layer.
HF_BLOCK_KEYS = (
    "qkv_w",
    "qkv_b",
    "out_w",
    "out_b",
    "ln_1_w",
    "ln_1_b",
    "fc_w",
    "fc_b",
    "proj_w",
    "proj_b",
    "ln_2_w",
    "ln_2_b",
)
POOLS = ("mean", "cls", "max", "last")
_MASKED = np.finfo(np.float32).min  # what transformers adds to the scores of padding keys


class HFFastTextTower(NumpyTextTower):
    """The numpy copy of a Hugging Face encoder text tower; load with `HFFastTextTower.load(dir)`.

    config: width, heads, layers, dim, act, ln_eps, norm ("post" | "pre"), positions
    ("absolute" | "after_padding": RoBERTa's ids counted from pad_token_id + 1), pad_token_id (the
    model's: padding keys are masked and ignored by pooling), pool (`POOLS`), pooler_act (a dense
    layer on the pooled token, e.g. BERT's tanh pooler, or None) and head (projection steps:
    {"op": "linear", "w": name, "b": name | None}, {"op": "act", "act": name} or {"op":
    "normalize"}: L2, as torch's F.normalize).
    """

    def __init__(self, config: dict, weights: dict[str, np.ndarray], tokenizer: HFTextTokenizer):
        super().__init__(config, weights, tokenizer)
        self.pre_ln = config["norm"] == "pre"
        self.pad_token_id = int(config["pad_token_id"])
        self.pool = config["pool"]
        self.pooler_act = config.get("pooler_act")
        self.head = list(config.get("head", []))
        for step in self.head:
            if step["op"] == "act" and step["act"] not in ACTIVATIONS:
                raise ModelError(f"unknown activation {step['act']!r} in the fast text tower")
        if self.pool not in POOLS:
            raise ModelError(f"unknown pooling {self.pool!r} in the fast text tower")

    EXPORT_FORMAT = (HF_FORMAT, HF_FORMAT_VERSION)

    @staticmethod
    def _read_tokenizer(out_dir: Path, config: dict) -> HFTextTokenizer:
        tok = config["tokenizer"]
        try:
            return HFTextTokenizer(
                (out_dir / "tokenizer.json").read_text(encoding="utf-8"),
                int(config["context_length"]),
                int(tok["pad_id"]),
                tok.get("clean"),
                tok.get("strip_sep_id"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            raise  # the export is incomplete (NumpyTextTower.load says so)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception for bad JSON
            raise ModelError(f"fast text tower in {out_dir} has a bad tokenizer: {e}") from e

    def _token_batch(self, rows: list) -> tuple[np.ndarray]:
        # Padding keys are masked and pooling skips them, so the batch is cut to its longest row;
        # unless the tokenizer pads with an id the model does not mask, which the model then sees.
        length = max(len(r) for r in rows)
        if self.tokenizer.pad_id != self.pad_token_id:
            length = self.context_length
        return (self.tokenizer.pad(rows, length),)

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        return self.forward(ids)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """(n, L) token ids -> (n, dim) unnormalised embeddings, as the torch tower computes them."""
        w = self.w
        n, length = ids.shape
        mask = ids != self.pad_token_id
        if self.config["positions"] == "after_padding":
            pos = np.cumsum(mask, axis=1) * mask + self.pad_token_id
        else:
            pos = np.arange(length)
        x = w["token_embedding"][ids] + w["positional_embedding"][pos]
        if "type_embedding" in w:
            x += w["type_embedding"]
        x = x.reshape(n * length, self.width).astype(np.float32, copy=False)
        if "emb_ln_w" in w:
            x = layer_norm(x, w["emb_ln_w"], w["emb_ln_b"], self.eps)
        bias = np.where(mask, np.float32(0), _MASKED).astype(np.float32)[:, None, None, :]
        for i in range(self.layers):
            x = self._block(x, i, n, bias)
        if "ln_final_w" in w:
            x = layer_norm(x, w["ln_final_w"], w["ln_final_b"], self.eps)
        x = self._pooled(x.reshape(n, length, self.width), mask)
        for step in self.head:
            if step["op"] == "linear":
                x = linear(x, w[step["w"]], w[step["b"]] if step.get("b") else None)
            elif step["op"] == "normalize":
                x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))
            else:
                x = ACTIVATIONS[step["act"]](x)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _block(self, x: np.ndarray, i: int, n: int, bias: np.ndarray) -> np.ndarray:
        w, eps, width, heads = self.w, self.eps, self.width, self.heads
        h = layer_norm(x, w["ln_1_w"][i], w["ln_1_b"][i], eps) if self.pre_ln else x
        qkv = linear(h, w["qkv_w"][i], w["qkv_b"][i])
        q, k, v = (split_heads(qkv[:, j * width : (j + 1) * width], n, heads) for j in range(3))
        a = linear(attend(q, k, v, bias), w["out_w"][i], w["out_b"][i])
        if self.pre_ln:
            x = x + a
            h = layer_norm(x, w["ln_2_w"][i], w["ln_2_b"][i], eps)
        else:
            x = h = layer_norm(x + a, w["ln_1_w"][i], w["ln_1_b"][i], eps)
        h = self.act(linear(h, w["fc_w"][i], w["fc_b"][i]))
        h = linear(h, w["proj_w"][i], w["proj_b"][i])
        if self.pre_ln:
            return x + h
        return layer_norm(x + h, w["ln_2_w"][i], w["ln_2_b"][i], eps)

    def _pooled(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.pool == "mean":  # open_clip's MeanPooler and sentence-transformers' mean
            m = mask[:, :, None].astype(np.float32)
            return (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
        if self.pool == "max":  # over real tokens (sentence-transformers' max)
            return np.where(mask[:, :, None], x, -np.inf).max(axis=1)
        if self.pool == "last":  # the last real token
            at = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
            return x[np.arange(len(x)), at]
        x = x[:, 0]
        if self.pooler_act:  # BERT's pooler: a dense layer and tanh on the first token
            x = ACTIVATIONS[self.pooler_act](linear(x, self.w["pooler_w"], self.w["pooler_b"]))
        return x
