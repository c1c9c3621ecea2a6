"""The open_clip text tower in numpy: loads an export written by `query_text.export` (weights
memory-mapped from .npy files, one file per weight kind, stacked over layers) and embeds texts.

Only stdlib and numpy are imported: a search process embeds its query without torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from ...errors import ModelError
from ..base import Tower, read_versioned
from .numpy_ops import (
    ACTIVATIONS,
    SMALL_BATCH_TOKENS,
    attend,
    halves,
    layer_norm,
    linear,
    one_blas_thread,
    second_core_idle,
    split_heads,
)
from .tokenizer import ClipBpeTokenizer

FORMAT = "mmsearch-fast-text"
FORMAT_VERSION = 1

# Weight files. Per-layer weights are stacked over layers, so a 12-layer tower is ~17 files
# (np.load costs ~0.1 ms per file). Matrices are stored (in, out) so the forward reads x @ w.
BLOCK_KEYS = (
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
OPTIONAL_BLOCK_KEYS = ("ls_1", "ls_2")


class NumpyTextTower(Tower):
    """What the numpy text towers share: a tokenizer with `encode` and `token_rows`, and a
    forward pass over a batch of token ids made by `_token_batch`."""

    def __init__(self, config: dict, weights: dict[str, np.ndarray], tokenizer):
        """The transformer's shape from an export's config.json; `weights` memory-mapped."""
        self.config = config
        self.w = weights
        self.tokenizer = tokenizer
        self.context_length = int(config["context_length"])
        self.dim = int(config["dim"])
        self.width, self.heads = int(config["width"]), int(config["heads"])
        self.layers = int(config["layers"])
        self.eps = float(config["ln_eps"])
        self.act = ACTIVATIONS[config["act"]]

    EXPORT_FORMAT: tuple[str, int] = ("", 0)  # the export's format and version (config.json)

    @classmethod
    def load(cls, out_dir: Path):
        """Open an export written for this tower (memory-mapped; imports no torch)."""
        out_dir = Path(out_dir)
        config = read_config(out_dir, *cls.EXPORT_FORMAT)
        try:
            weights = read_weights(out_dir, config["weights"])
            tokenizer = cls._read_tokenizer(out_dir, config)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"fast text tower in {out_dir} is incomplete: {e}") from e
        return cls(config, weights, tokenizer)

    @staticmethod
    def _read_tokenizer(out_dir: Path, config: dict):
        """The export's tokenizer, from its files and config["tokenizer"]."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens the text occupies, without the special tokens around it."""
        return len(self.tokenizer.encode(text))

    def embed_batch(self, batch: Sequence[str]) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids, *rest = self._token_batch(self.tokenizer.token_rows(list(batch)))
        limit = one_blas_thread() if ids.size <= SMALL_BATCH_TOKENS else contextlib.nullcontext()
        with limit:
            return self._forward(ids, *rest)

    def _token_batch(self, rows: list) -> tuple:
        """(ids, *what else the forward pass takes) for these token rows."""
        raise NotImplementedError

    def _forward(self, ids: np.ndarray, *rest) -> np.ndarray:
        raise NotImplementedError


class FastTextTower(NumpyTextTower):
    """The open_clip text tower in numpy; load with `FastTextTower.load(dir)`."""

    EXPORT_FORMAT = (FORMAT, FORMAT_VERSION)

    def __init__(self, config: dict, weights: dict[str, np.ndarray], tokenizer: ClipBpeTokenizer):
        super().__init__(config, weights, tokenizer)
        # A layer runs as two halves (numpy_ops.halves) where heads and hidden units split evenly.
        self.parts = 2 if self.heads % 2 == 0 and weights["fc_w"].shape[2] % 2 == 0 else 1

    @staticmethod
    def _read_tokenizer(out_dir: Path, config: dict) -> ClipBpeTokenizer:
        tok = config["tokenizer"]
        return ClipBpeTokenizer(
            np.load(out_dir / "bpe_pair_keys.npy"),
            np.load(out_dir / "bpe_pair_ranks.npy"),
            tok["specials"],
            int(config["context_length"]),
            tok["clean"],
            int(tok["sot_id"]),
            int(tok["eot_id"]),
        )

    def _token_batch(self, rows: list) -> tuple[np.ndarray, np.ndarray]:
        # Causal attention plus pooling at the EOT position make every position after the pooled
        # one irrelevant, so the batch is cut to its longest row instead of the full context.
        length = max(len(r) for r in rows)
        ids = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        # open_clip pools at argmax(token id) (first maximum), which is EOT unless the text holds a
        # literal special token; numpy's argmax also returns the first maximum.
        return ids, ids.argmax(axis=1)

    def _forward(self, ids: np.ndarray, pool: np.ndarray) -> np.ndarray:
        w, eps = self.w, self.eps
        n, length = ids.shape
        width = self.width
        # A small batch runs on one BLAS thread (embed_batch): its halves may use two cores.
        at_once = ids.size <= SMALL_BATCH_TOKENS and second_core_idle()
        rows = np.arange(n)
        x = w["token_embedding"][ids] + w["positional_embedding"][:length]
        x = x.reshape(n * length, width).astype(np.float32, copy=False)
        mask = np.triu(np.full((length, length), -np.inf, dtype=np.float32), 1)
        for i in range(self.layers):
            h = layer_norm(x, w["ln_1_w"][i], w["ln_1_b"][i], eps)
            hq, m = h, mask
            if i == self.layers - 1:
                # Only the pooled token reaches the output, so the last layer runs its query,
                # residual stream and MLP for that row alone (attending to all keys before it).
                hq = h.reshape(n, length, width)[rows, pool]
                m = mask[pool][:, None, None, :]
                x = x.reshape(n, length, width)[rows, pool]
            a = self._parts(partial(self._attention, i, h=h, hq=hq, n=n, mask=m), at_once)
            a += w["out_b"][i]
            if "ls_1" in w:
                a *= w["ls_1"][i]
            x = x + a
            h = layer_norm(x, w["ln_2_w"][i], w["ln_2_b"][i], eps)
            h = self._parts(partial(self._mlp, i, h=h), at_once)
            h += w["proj_b"][i]
            if "ls_2" in w:
                h *= w["ls_2"][i]
            x = x + h
        # x is now the pooled rows; ln_final is per token, so normalising after pooling is exact.
        x = layer_norm(x, w["ln_final_w"], w["ln_final_b"], eps)
        if "text_projection" in w:
            x = x @ w["text_projection"]
            if "text_projection_b" in w:
                x = x + w["text_projection_b"]
        return np.ascontiguousarray(x, dtype=np.float32)

    def _parts(self, fn, at_once: bool) -> np.ndarray:
        return halves(fn, at_once) if self.parts == 2 else fn(0)

    def _attention(self, i: int, s: int, h, hq, n: int, mask) -> np.ndarray:
        """Part `s` of layer i's attention (its share of the heads; keys and values from all
        rows of h, queries from the rows hq) through its rows of the output projection."""
        w, width = self.w, self.width
        part, heads = width // self.parts, self.heads // self.parts
        qkv_w, qkv_b = w["qkv_w"][i], w["qkv_b"][i]
        q, k, v = (
            split_heads(linear(src, qkv_w[:, c : c + part], qkv_b[c : c + part]), n, heads)
            for src, c in ((hq, s * part), (h, width + s * part), (h, 2 * width + s * part))
        )
        return attend(q, k, v, mask) @ w["out_w"][i][s * part : (s + 1) * part]

    def _mlp(self, i: int, s: int, h) -> np.ndarray:
        """Part `s` of layer i's MLP: its share of the hidden units, through their rows of
        proj_w."""
        w = self.w
        part = w["fc_w"].shape[2] // self.parts
        cols = slice(s * part, (s + 1) * part)
        return self.act(linear(h, w["fc_w"][i][:, cols], w["fc_b"][i][cols])) @ w["proj_w"][i][cols]


def read_config(out_dir: Path, fmt: str, version: int) -> dict:
    """config.json of an export, checked to be `fmt` version `version`."""
    try:
        return read_versioned(Path(out_dir) / "config.json", fmt, version)
    except FileNotFoundError:
        raise ModelError(f"no fast text tower in {out_dir} (no config.json)") from None


def read_weights(out_dir: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """An export's weights by name, memory-mapped (a query reads only the pages it uses)."""
    return {name: np.asarray(np.load(out_dir / f"{name}.npy", mmap_mode="r")) for name in names}
