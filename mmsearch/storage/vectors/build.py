"""Building an IVF index in one pass over vectors that arrive in batches (from the catalog):
training on a sample, filling the lists, and tuning nprobe against an exact scan made in the same
pass, with queries held out of the data and the same queries shifted off it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .faiss_index import (
    FLAT,
    RECALL_K,
    TRAIN_POINTS_PER_LIST,
    TUNING_QUERIES,
    VectorIndex,
    _faiss,
    is_ivf,
    ivf_encoding,
    ivf_lists,
    shifted,
)


def tuning_sample(n: int, nlist: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions, among n vectors, of the held-out tuning queries and of the training sample:
    disjoint random draws (a fixed seed: rebuilding the same catalog gives the same index)."""
    order = np.random.default_rng(seed).permutation(n)
    n_queries = min(TUNING_QUERIES, max(1, n // 10))
    n_train = min(n - n_queries, TRAIN_POINTS_PER_LIST * nlist)
    return np.sort(order[:n_queries]), np.sort(order[n - n_train :])


class ExactNeighbours:
    """Exact top-k ids of a few queries over vectors that arrive in batches (a flat scan
    without holding the whole collection): ground truth for tuning nprobe."""

    def __init__(self, queries: np.ndarray, k: int):
        faiss = _faiss()
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.k = k
        self.heap = faiss.ResultHeap(len(self.queries), k, keep_max=True)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        faiss = _faiss()
        if not len(ids) or not len(self.queries):
            return
        k = min(self.k, len(ids))
        scores, rows = faiss.knn(self.queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        ids = np.asarray(ids, np.int64)
        self.heap.add_result(scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1))

    def result(self) -> np.ndarray:
        self.heap.finalize()
        return self.heap.I


def build_ivf(
    index_type: str,
    dim: int,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    queries: tuple[np.ndarray, np.ndarray],
    train: np.ndarray | None = None,
    trained: VectorIndex | None = None,
    n: int = 0,
    progress=None,
) -> VectorIndex:
    """An IVF index over vectors that arrive in (ids, vectors) batches, nprobe tuned on `queries`
    (stored vectors: (ids, vectors)) against an exact scan made in the same pass.

    Trains on `train` (a sample of the n vectors), or reuses the training of `trained`, an index of
    the same type whose vectors are dropped."""
    if trained is not None:
        vi = trained
        vi.reset()
    else:
        vi = VectorIndex.create(index_type, dim)
        vi.train(train, n)
    query_ids, query_vecs = queries
    nq = len(query_ids)
    truth = ExactNeighbours(np.concatenate([query_vecs, shifted(query_vecs)]), RECALL_K + 1)
    done = 0
    for ids, vecs in batches:
        vi.add(ids, vecs)
        truth.add(ids, vecs)
        done += len(ids)
        if progress is not None:
            progress("vectors", done, n)
    found = truth.result()
    vi.tune(query_ids, query_vecs, found[:nq], found[nq:])
    return vi


def from_catalog(
    catalog,
    dim: int,
    index_type: str,
    trained: VectorIndex | None = None,
    trained_on=None,
    progress=None,
) -> VectorIndex:
    """An index of `index_type` over every vector in `catalog`, read in batches (at tens of
    millions of vectors the catalog's vectors are never all in memory besides the index).

    An IVF index is trained on a sample of the catalog, or keeps the training of `trained` (an
    index of the same type), and its nprobe is tuned on held-out catalog vectors against an exact
    scan made in the same pass. Too few vectors for IVF lists give an exact index."""
    db = catalog.db
    db.execute("BEGIN")  # one snapshot for the sample and the full pass
    try:
        ids = catalog.unit_ids()
        n = len(ids)
        if is_ivf(index_type) and ivf_lists(n) == 0:
            index_type = FLAT  # too few vectors to train lists on
        if not is_ivf(index_type):
            vi = VectorIndex(dim)
            for batch_ids, vecs in catalog.vector_batches(dim):
                vi.add(batch_ids, vecs)
            return vi
        nlist = int(index_type[3:].partition(",")[0])
        if trained is None and TRAIN_POINTS_PER_LIST * nlist > n:
            index_type = f"IVF{ivf_lists(n)},{ivf_encoding(index_type)}"
            nlist = ivf_lists(n)
        query_rows, train_rows = tuning_sample(n, nlist)
        query_ids = ids[query_rows]
        train = None if trained is not None else catalog.vectors_of(ids[train_rows], dim)
        vi = build_ivf(
            index_type,
            dim,
            catalog.vector_batches(dim),
            (query_ids, catalog.vectors_of(query_ids, dim)),
            train=train,
            trained=trained,
            n=n,
            progress=progress,
        )
        if trained is not None:
            vi.trained_on = trained_on or n
        return vi
    finally:
        db.execute("COMMIT")
