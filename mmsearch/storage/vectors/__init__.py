"""Vector backends: where the embeddings are searched.

- faiss_index.py: `VectorIndex`, a FAISS inner-product index over catalog ids (exact or IVF), the
  policy that picks its kind (`choose_type`) and its on-disk format.
- build.py: an IVF index built and tuned in one pass over the catalog's vectors.
- torch_exact.py: exact search with torch on a GPU that the installed faiss cannot use.
- engine.py: which of them answers (the one choice point), and faiss indexes copied onto GPUs.

A new backend is a new module here with `VectorIndex`'s `search(queries, k, allowed)` contract,
picked in engine.choose.
"""

from .build import ExactNeighbours, build_ivf, from_catalog, tuning_sample
from .faiss_index import (
    EXACT_BELOW,
    FLAT,
    INDEX_TYPES,
    RETRAIN_GROWTH,
    TARGET_RECALL,
    TRAIN_POINTS_PER_LIST,
    VectorIndex,
    choose_type,
    default_memory_budget,
    describe,
    is_ivf,
    ivf_encoding,
    ivf_lists,
    shifted,
)

__all__ = [
    "EXACT_BELOW", "FLAT", "INDEX_TYPES", "RETRAIN_GROWTH", "TARGET_RECALL", "TRAIN_POINTS_PER_LIST",
    "ExactNeighbours", "VectorIndex", "build_ivf", "from_catalog", "choose_type", "default_memory_budget",
    "describe", "ivf_encoding", "ivf_lists", "is_ivf", "shifted", "tuning_sample",
]  # fmt: skip
