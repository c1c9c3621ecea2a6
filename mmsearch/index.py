"""Vectors: an ID-mapped FAISS index over the catalog's unit ids (exact inner product)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _faiss():
    import faiss

    return faiss


class VectorIndex:
    """Exact inner-product search over L2-normalised float32 vectors, keyed by catalog unit id."""

    def __init__(self, dim: int, index=None):
        faiss = _faiss()
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        vi = cls(dim)
        vi.add(ids, vectors)
        return vi

    @classmethod
    def load(cls, path: Path, dim: int) -> VectorIndex:
        index = _faiss().read_index(str(path))
        if index.d != dim:
            raise ValueError(f"vector file has dimension {index.d}, manifest says {dim}")
        return cls(dim, index)

    def save(self, path: Path) -> None:
        """Atomic: readers see the old file or the new one, never half of one."""
        tmp = Path(str(path) + ".tmp")
        _faiss().write_index(self.index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def add(self, ids, vectors: np.ndarray) -> None:
        if len(ids):
            vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
            self.index.add_with_ids(vecs, np.asarray(ids, dtype=np.int64))

    def remove(self, ids) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for one query vector; `allowed` restricts to those ids."""
        faiss = _faiss()
        n = self.ntotal if allowed is None else min(self.ntotal, len(allowed))
        k = min(k, n)
        if k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        params = None
        if allowed is not None:
            params = faiss.SearchParameters(
                sel=faiss.IDSelectorBatch(np.asarray(allowed, np.int64))
            )
        scores, ids = self.index.search(q, k, params=params)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]
