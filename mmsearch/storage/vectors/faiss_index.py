"""Vectors: a FAISS inner-product index over the catalog's unit ids, exact or inverted-file.

Which index (measured on this project's 2-core CPU; MEASUREMENTS.md and benchmarks/RESULTS.md):
- Exact `IDMap2,FlatIP` below `EXACT_BELOW` vectors: one query scans everything (15 ms at 100k, 150 ms
  at 1M), which is fine for a few hundred thousand vectors and needs no training.
- Above it, IVF with a flat coarse quantizer and `nlist` ~ 4*sqrt(N) lists (autofaiss's rule, from the
  faiss guidelines), vectors stored uncompressed (`Flat`), so scores stay exact cosines, the search
  can be made exhaustive (nprobe = nlist) for complete results, and ids can be added and removed
  after training. HNSW was measured at recall 0.72-0.97 depending on the data, 2.5-3.5x the build
  time of IVF-Flat and no removal; IVF-PQ without re-ranking at recall <= 0.41: neither is used.
- A memory budget (default half the RAM: an indexing run holds the whole index in memory) switches
  the list encoding to `SQfp16` (half the bytes, recall unchanged in our measurements) and then to
  `SQ8` (a quarter, recall ceiling ~0.99 at nprobe = nlist): scores are then cosines to about 1e-3
  (fp16) or 1e-2 (8-bit).
- nprobe is tuned after each training: the smallest step whose recall@10 against an exact scan is
  at least `TARGET_RECALL` (at a two-standard-error lower bound) both on held-out stored vectors
  used as queries (each query's own vector left out of both answers) and on the same queries
  shifted off the data, as queries from another modality are (`shifted`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ...errors import UsageError

FLAT = "IDMap2,FlatIP"
EXACT_BELOW = 300_000  # auto: exact search below this many vectors
TARGET_RECALL = 0.95  # recall@10 against exact search that nprobe is tuned for
RECALL_K = 10
TUNING_QUERIES = 1000
FILTER_SCAN_BELOW = 0.5  # a filter passing a smaller share of the vectors scans every list
RETRAIN_GROWTH = 4  # retrain once the index holds this many times the vectors it was trained on
INDEX_TYPES = ("auto", "flat", "ivf")
# faiss warns below 39 training points per list; autofaiss trains on 30-256. 40 keeps k-means (the
# cost of a training: points x lists x dim x iterations) near a minute at 1M vectors on 2 cores.
TRAIN_POINTS_PER_LIST = 40
KMEANS_ITERATIONS = 10  # faiss's default is 25; 10 gave the same recall per nprobe, 2.5x faster
MIN_LISTS = 8
MAX_LISTS = 65536
_ENCODINGS = (("Flat", 4), ("SQfp16", 2), ("SQ8", 1))  # list encoding, bytes per dimension


def _faiss():
    import faiss

    return faiss


def search_on_one_thread() -> None:
    """Let faiss search with one OpenMP thread in the calling thread (the setting is per thread).
    A search is one query, which gains nothing from a parallel region (faiss scans 1M vectors for
    one query single-threaded anyway, MEASUREMENTS.md), while on a busy 2-core machine the region
    waits for both threads to be scheduled: one query over 10k vectors took 60 ms instead of 7
    (benchmarks/RESULTS.md, serve). The server's request threads and the CLI's call this; the
    library leaves the process's threads to its caller."""
    _faiss().omp_set_num_threads(1)


def ivf_lists(n: int) -> int:
    """Number of inverted lists for n vectors: the power of two nearest 4*sqrt(n), as autofaiss
    picks, but never so many that a training sample lacks 40 points per list."""
    if n < TRAIN_POINTS_PER_LIST * MIN_LISTS:
        return 0
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    most = 2 ** int(math.log2(n // TRAIN_POINTS_PER_LIST))
    return int(max(MIN_LISTS, min(nlist, most, MAX_LISTS)))


def default_memory_budget() -> int:
    """Half the machine's RAM: an indexing run holds the whole vector index in memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_type(
    n: int,
    dim: int,
    choice: str = "auto",
    exact_below: int = EXACT_BELOW,
    memory_budget: int | None = None,
) -> str:
    """The index type (a faiss factory string) for n vectors of dimension dim.

    choice: "flat" always exact; "ivf" inverted lists whenever there are enough vectors to train
    them; "auto" exact below `exact_below` vectors, inverted lists from there on."""
    if choice not in INDEX_TYPES:
        raise UsageError(f"unknown index type {choice!r}; use {', '.join(INDEX_TYPES)}")
    nlist = ivf_lists(n)
    if choice == "flat" or nlist == 0 or (choice == "auto" and n < exact_below):
        return FLAT
    budget = default_memory_budget() if memory_budget is None else memory_budget
    fits = [e for e, per_dim in _ENCODINGS if n * (per_dim * dim + 8) + nlist * dim * 4 <= budget]
    encoding = fits[0] if fits else _ENCODINGS[-1][0]
    return f"IVF{nlist},{encoding}"


def is_ivf(index_type: str) -> bool:
    return index_type.startswith("IVF")


def ivf_encoding(index_type: str) -> str | None:
    return index_type.partition(",")[2] if is_ivf(index_type) else None


def describe(index) -> str:
    """The factory string of a loaded faiss index ("?" for one mmsearch does not write)."""
    faiss = _faiss()
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "?"
    if isinstance(index, faiss.IndexIDMap2):
        return FLAT if isinstance(faiss.downcast_index(index.index), faiss.IndexFlatIP) else "?"
    ivf = index
    if isinstance(ivf, faiss.IndexIVFFlat):
        encoding = "Flat"
    elif isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        qtype = ivf.sq.qtype
        encoding = {
            faiss.ScalarQuantizer.QT_fp16: "SQfp16",
            faiss.ScalarQuantizer.QT_8bit: "SQ8",
        }.get(qtype, "?")
    else:
        return "?"
    return f"IVF{ivf.nlist},{encoding}"


class VectorIndex:
    """Inner-product search over L2-normalised float32 vectors, keyed by catalog unit id.

    Exact (`FLAT`) or an inverted-file index (`IVF<nlist>,<encoding>`): `search` returns the same
    thing for both, the top k by cosine, falling back to an exhaustive pass rather than returning
    fewer hits than exist."""

    def __init__(self, dim: int, index=None, trained_on: int | None = None):
        faiss = _faiss()
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        # mmsearch's IVF indexes hold the catalog ids in their lists themselves (no IDMap: its
        # id table goes out of step when an IVF index removes ids).
        self.ivf = self.index if isinstance(self.index, faiss.IndexIVF) else None
        self.trained_on = trained_on  # vectors in the catalog when the lists were trained
        self.recall: float | None = None  # recall@10 measured when nprobe was tuned
        self.recall_shifted: float | None = None  # the same for queries off the data

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_type(self) -> str:
        return describe(self.index)

    @property
    def exact(self) -> bool:
        return self.ivf is None

    @property
    def nprobe(self) -> int | None:
        return None if self.ivf is None else int(self.ivf.nprobe)

    @property
    def nlist(self) -> int | None:
        return None if self.ivf is None else int(self.ivf.nlist)

    @classmethod
    def create(cls, index_type: str, dim: int) -> VectorIndex:
        """An empty index of that type (an IVF one still needs `train`)."""
        faiss = _faiss()
        if not is_ivf(index_type):
            return cls(dim)
        index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = 1234
        return cls(dim, index)

    @classmethod
    def load(cls, path: Path, dim: int, mmap: bool = False, index_type: str = FLAT) -> VectorIndex:
        """Read a saved index. With `mmap` (readers) the file is mapped, not copied: opening an IVF
        file then reads only its centroids (0.5 ms instead of 0.6 s at 200k x 512) and a query
        touches only the lists it probes; a flat file opens in ~25 ms instead of ~0.6 s. An index
        opened that way is read-only. `index_type` is what the file is expected to hold (the two
        kinds need different flags)."""
        faiss = _faiss()
        flags = 0
        if mmap:
            flags = faiss.IO_FLAG_MMAP if is_ivf(index_type) else faiss.IO_FLAG_MMAP_IFC
        index = faiss.read_index(str(path), flags)
        if index.d != dim:
            raise ValueError(f"vector file has dimension {index.d}, manifest says {dim}")
        return cls(dim, index)

    def save(self, path: Path) -> None:
        """Atomic: readers see the old file or the new one, never half of one."""
        from ..atomic import replace_file

        faiss = _faiss()

        def write(f) -> None:
            try:
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
            except RuntimeError as e:  # faiss wraps the writer's OSError in a C++ exception
                if "No space left" in str(e) or "Errno 28" in str(e):
                    import errno

                    raise OSError(errno.ENOSPC, "No space left on device") from None
                raise

        replace_file(Path(path), write)

    # --- contents --------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors: np.ndarray, trained_on: int) -> None:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self.index.train(vecs)
        self.trained_on = trained_on

    def reset(self) -> None:
        """Drop every vector; an IVF index keeps its training."""
        self.index.reset()

    def add(self, ids, vectors: np.ndarray) -> None:
        if len(ids):
            vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
            self.index.add_with_ids(vecs, np.asarray(ids, dtype=np.int64))

    def remove(self, ids) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    # --- search ----------------------------------------------------------------------------
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
        sel = None if allowed is None else _Selector(allowed)
        if self.ivf is None:
            params = None if sel is None else faiss.SearchParameters(sel=sel.faiss)
            scores, ids = self.index.search(q, k, params=params)
        else:
            nprobe = self._probes(k, n)
            scores, ids = self._search_ivf(q, k, nprobe, sel)
            if (ids[0] >= 0).sum() < k and nprobe < self.ivf.nlist:
                # The probed lists held fewer than k matches (a large k, or a --type filter that
                # selects few vectors): scan every list so nothing is silently missing.
                scores, ids = self._search_ivf(q, k, self.ivf.nlist, sel)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def _probes(self, k: int, n: int) -> int:
        """nprobe is tuned for the top 10 of all vectors; probe proportionally more lists for a
        deeper k. A filter (`--type`) is answered exactly, by a scan of every list that compares
        only the vectors it lets through, when it lets through less than half of them: its
        vectors are typically those of one modality, lying together away from the query, where the
        nearest lists may hold enough of them but not the best. A broader filter probes 1/share
        times more lists. Past half the lists a full scan costs little more."""
        share = n / max(self.ntotal, 1)
        if share < FILTER_SCAN_BELOW:
            return self.ivf.nlist
        nprobe = math.ceil(self.ivf.nprobe * max(1.0, k / RECALL_K) / share)
        return self.ivf.nlist if nprobe * 2 >= self.ivf.nlist else nprobe

    def _search_ivf(self, q: np.ndarray, k: int, nprobe: int, sel=None):
        params = _faiss().SearchParametersIVF(nprobe=int(nprobe))
        if sel is not None:
            params.sel = sel.faiss
        return self.index.search(q, k, params=params)

    # --- tuning ----------------------------------------------------------------------------
    def tune(
        self,
        query_ids: np.ndarray,
        queries: np.ndarray,
        truth: np.ndarray,
        shifted_truth: np.ndarray | None = None,
        target: float = TARGET_RECALL,
    ) -> tuple[int, float]:
        """Set nprobe to the smallest step reaching `target` recall@10; returns (nprobe, recall).

        `queries` are stored vectors (ids `query_ids`), `truth` their exact top-11 ids over the
        whole index; each query's own id is left out of both answers, so it stands for a fresh
        query near the data. `shifted_truth` is the exact top 10 of `shifted(queries)`, queries
        off the data (see `shifted`), which must reach the target too. A step is accepted when
        the mean recall minus two standard errors reaches the target."""
        if self.ivf is None:
            return 0, 1.0
        query_ids = np.asarray(query_ids, np.int64)
        queries = np.ascontiguousarray(queries, np.float32).reshape(-1, self.dim)
        sets = [(queries, query_ids, truth)]
        if shifted_truth is not None:
            sets.append((shifted(queries), np.full(len(queries), -1, np.int64), shifted_truth))
        nprobe, recalls = self.ivf.nlist, [1.0] * len(sets)
        for step in _probe_steps(self.ivf.nlist):
            results = [
                _recall(self._search_ivf(q, RECALL_K + 1, step)[1], own, t) for q, own, t in sets
            ]
            nprobe, recalls = step, [mean for mean, _ in results]
            if all(mean - 2 * err >= target for mean, err in results):
                break
        self.ivf.nprobe = nprobe
        self.recall = recalls[0]
        self.recall_shifted = recalls[1] if len(recalls) > 1 else None
        return nprobe, self.recall


SHIFT = 2.0


def shifted(queries: np.ndarray, seed: int = 0) -> np.ndarray:
    """The queries moved off the data along one random direction, to cosine 0.45 with where they
    started. Queries from another modality sit like that (a CLIP text query has cosine ~0.3 with
    its best image, where image neighbours have ~0.8), and an IVF index answers them with lower
    recall at the same nprobe: on our synthetic data 0.90 where stored-like queries get 0.97."""
    direction = np.random.default_rng(seed).standard_normal(queries.shape[1]).astype(np.float32)
    out = queries + SHIFT * direction / np.linalg.norm(direction)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: np.ndarray, own: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean recall@10 of `found` against `truth` leaving out each query's `own` id, and its
    standard error."""
    per_query = []
    for f, o, t in zip(found, own, truth, strict=True):
        expected = t[(t != o) & (t >= 0)][:RECALL_K]
        if len(expected):
            got = f[(f != o) & (f >= 0)][:RECALL_K]
            per_query.append(len(np.intersect1d(got, expected)) / len(expected))
    if not per_query:
        return 1.0, 0.0
    per_query = np.array(per_query)
    return float(per_query.mean()), float(per_query.std()) / math.sqrt(len(per_query))


class _Selector:
    """A faiss id filter. Catalog ids are dense row ids, so a bitmap over them is small (1.25 MB
    per 10M) and builds in about 1 ms for 100k ids, where faiss's IDSelectorBatch (a hash set)
    takes 32 ms (118 ms for 500k), more than the search itself."""

    def __init__(self, allowed):
        faiss = _faiss()
        allowed = np.asarray(allowed, np.int64)
        top = int(allowed.max()) + 1 if len(allowed) else 1
        if top <= max(1 << 24, 64 * len(allowed)) and (not len(allowed) or allowed.min() >= 0):
            mask = np.zeros(top, bool)
            mask[allowed] = True
            self.bits = np.packbits(mask, bitorder="little")  # kept alive: faiss holds a pointer
            self.faiss = faiss.IDSelectorBitmap(len(self.bits), faiss.swig_ptr(self.bits))
        else:
            self.faiss = faiss.IDSelectorBatch(allowed)


def _probe_steps(nlist: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... (steps of about 1.4x), ending at nlist (exhaustive)."""
    steps, p = {nlist}, 1
    while p < nlist:
        steps |= {p, p + p // 2}
        p *= 2
    return sorted(s for s in steps if s <= nlist)
