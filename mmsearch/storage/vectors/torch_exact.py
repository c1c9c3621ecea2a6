"""Exact vector search through torch, for GPUs that the installed faiss cannot use (engine.py
decides when).

Most users with a GPU have a CUDA torch and faiss-cpu (pip's default). For them a resident search
(the Python library answering many queries) keeps the index's vectors on the GPU in fp16 and
answers with a matmul and a top-k: exact, ~0.4 ms per query over 1M x 512 on an H100 (DESIGN.md),
against hundreds of ms for a CPU scan. The vectors come from the catalog, which holds them all.
Scores are computed in fp16 (cosines to ~1e-3) and the top k are re-scored in fp32 from the
catalog's float32 vectors, so reported scores match the CPU path.
"""

from __future__ import annotations

import copy

import numpy as np


class TorchExactIndex:
    """All of a catalog's vectors on one torch device; `search` has VectorIndex's contract."""

    def __init__(self, catalog, dim: int, device: str):
        import torch

        self.dim, self.device = dim, torch.device(device)
        self.catalog = catalog
        half = self.device.type != "cpu"  # fp16 matmuls are slow or missing on CPUs
        self.dtype = torch.float16 if half else torch.float32
        ids, parts = [], []
        for batch_ids, vecs in catalog.vector_batches(dim):
            ids.append(batch_ids)
            parts.append(torch.from_numpy(vecs.copy()).to(self.device, self.dtype))
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.ids_on_device = torch.from_numpy(self.ids).to(self.device)
        self.vectors = torch.cat(parts) if parts else torch.zeros(0, dim, device=self.device)

    def for_catalog(self, catalog) -> TorchExactIndex:
        """The same vectors, re-scored through another connection to the same catalog (one
        per thread)."""
        other = copy.copy(self)
        other.catalog = catalog
        return other

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for one query vector; `allowed` restricts to those ids."""
        import torch

        q = torch.from_numpy(np.ascontiguousarray(query, np.float32).reshape(self.dim))
        with torch.no_grad():
            scores = self.vectors @ q.to(self.device, self.dtype)
            if allowed is not None:
                keep = torch.isin(
                    self.ids_on_device,
                    torch.from_numpy(np.asarray(allowed, np.int64)).to(self.device),
                )
                n = int(keep.sum())
                scores = scores.float().masked_fill(~keep, float("-inf"))
            else:
                n = self.ntotal
            k = min(k, n)
            if k <= 0:
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            # a few extra candidates so fp16 rounding cannot push a true top-k vector out
            top = torch.topk(scores, min(n, k + max(8, k // 4))).indices.cpu().numpy()
        ids = self.ids[top]
        exact = self.catalog.vectors_of(ids, self.dim) @ np.asarray(query, np.float32).reshape(-1)
        order = np.argsort(-exact, kind="stable")[:k]
        return exact[order].astype(np.float32), ids[order]
