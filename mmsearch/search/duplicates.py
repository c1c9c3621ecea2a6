"""Near-duplicates: groups of files that are copies, resized or recompressed versions of each other,
found from what the index holds (its vectors, and the perceptual hashes of photos); nothing is
embedded again. Measured in benchmarks/bench_duplicates.py.

- One vector per file (a recording's windows averaged), so a file is compared as a whole.
- Candidate pairs: each file's `NEIGHBOURS` nearest files, kept when their cosine reaches the
  threshold (a k-NN graph: memory stays at most n * NEIGHBOURS pairs however loose the
  threshold). Exact below `EXACT_BELOW` files (blocked matrix products, n^2 in BLAS); above, the
  pass an IVF index makes, one k-means cell at a time (see `_partition`): n^1.5, so 1M files take
  minutes where the exact pass would take hours.
- For a modality with `duplicate_hash` (photos), the perceptual hashes must also be at most
  `max_hash_distance` bits apart: a weak model can score a heavy re-encode below two distinct
  photos of the same kind of scene; the hashes of 99.8% of re-encodes differ by 0-4 bits of 64,
  those of distinct photos by 12 or more (benchmarks/RESULTS.md).
- Groups are the connected components of the kept pairs (union-find).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..loaders.phash import hamming
from ..modalities import BY_NAME, TABLE
from ..records import show_path

EXACT_BELOW = 20_000  # files; an exact k-NN pass over 20k x 512 takes ~2 s on two cores
NEIGHBOURS = 16  # candidate neighbours per file
NPROBE = 8  # lists probed per file in the IVF pass
MAX_HASH_DISTANCE = 4  # bits of 64; see the module docstring


@dataclass(frozen=True)
class Candidates:
    """Pairs (a[i], b[i]) of row positions, a < b, with their cosine `score`."""

    a: np.ndarray
    b: np.ndarray
    score: np.ndarray

    def keep(self, mask: np.ndarray) -> Candidates:
        return Candidates(self.a[mask], self.b[mask], self.score[mask])


def _faiss():
    import faiss

    return faiss


def near_pairs(
    vectors: np.ndarray,
    threshold: float,
    neighbours: int = NEIGHBOURS,
    exact_below: int = EXACT_BELOW,
    nprobe: int = NPROBE,
) -> Candidates:
    """Pairs of rows of `vectors` (L2-normalised) with a cosine of at least `threshold`, at
    most `neighbours` per row (its nearest), each pair once."""
    x = np.ascontiguousarray(vectors, np.float32)
    n = len(x)
    if n < exact_below:
        blocks = [(np.arange(n), np.arange(n))]
    else:
        blocks = _partition(x, nprobe)
    a, b, s = [], [], []
    for rows, candidates in blocks:
        for start in range(0, len(rows), BLOCK):
            q = rows[start : start + BLOCK]
            i, j, score = _above(x[q] @ x[candidates].T, threshold, neighbours)
            a.append(q[i])
            b.append(candidates[j])
            s.append(score)
    return _unique_pairs(np.concatenate(a), np.concatenate(b), np.concatenate(s))


BLOCK = 2048  # query rows per matrix product (2048 x 20k scores: 160 MB)


def _above(scores: np.ndarray, threshold: float, k: int):
    """(row, column, score) of the entries >= threshold, at most the k highest per row."""
    over = scores >= threshold
    crowded = np.flatnonzero(over.sum(1) > k)
    if len(crowded):  # rows with more than k: only their k best stay
        part = scores[crowded]
        cut = np.partition(part, part.shape[1] - k, axis=1)[:, part.shape[1] - k]
        over[crowded] &= part >= cut[:, None]
    i, j = np.nonzero(over)
    return i, j, scores[i, j]


def _unique_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> Candidates:
    """Each unordered pair once (with its score), self-pairs dropped."""
    ok = a != b
    lo, hi, s = np.minimum(a, b)[ok], np.maximum(a, b)[ok], s[ok]
    order = np.lexsort((hi, lo))
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return Candidates(lo[first], hi[first], s[first].astype(np.float32))


def _partition(x: np.ndarray, nprobe: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, candidate rows) blocks covering the near pairs of x, as an IVF search of every row
    would find them: ~2*sqrt(n) k-means cells; each row is stored in the cell of its nearest
    centroid and searched in the cells of its `nprobe` nearest ones, so a block is a cell's
    visitors against its residents. Fewer cells than an IVF index's 4*sqrt(n): here every row is
    a query, and the cost of training and assigning (n * cells) is balanced against that of the
    comparisons (n * nprobe * n / cells).

    An IVF index's own search costs the same multiply-adds, but one query at a time (measured
    ~2 GFLOP/s here); a block is one matrix product (BLAS, 10x that)."""
    from ..storage.vectors.faiss_index import KMEANS_ITERATIONS, TRAIN_POINTS_PER_LIST

    faiss = _faiss()
    n, dim = x.shape
    nlist = int(2 ** round(math.log2(2 * math.sqrt(n))))
    sample = np.random.default_rng(0).choice(n, min(n, TRAIN_POINTS_PER_LIST * nlist), False)
    kmeans = faiss.Kmeans(dim, nlist, niter=KMEANS_ITERATIONS, seed=1234, spherical=True)
    kmeans.train(x[np.sort(sample)])
    _, near = kmeans.index.search(x, min(nprobe, nlist))
    residents, visitors = _members(near[:, 0], nlist), _members(near.ravel(), nlist, near.shape[1])
    return [(visitors[c], residents[c]) for c in range(nlist) if len(residents[c])]


def _members(cell: np.ndarray, nlist: int, per_row: int = 1) -> list[np.ndarray]:
    """The rows in each cell, given each row's `per_row` cells (flattened row-major)."""
    order = np.argsort(cell, kind="stable")
    bounds = np.searchsorted(cell[order], np.arange(nlist + 1))
    rows = order // per_row
    return [rows[bounds[c] : bounds[c + 1]] for c in range(nlist)]


def hash_agrees(pairs: Candidates, hashes: np.ndarray | None, max_distance: int) -> np.ndarray:
    """Which pairs have perceptual hashes (signed 64-bit, one per row) at most `max_distance`
    bits apart; all of them without hashes."""
    if hashes is None:
        return np.ones(len(pairs.a), bool)
    return hamming(hashes[pairs.a], hashes[pairs.b]) <= max_distance


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union-find over n items joined by edges (a[i], b[i]): each item's component label (the
    smallest member), by hooking and pointer jumping in numpy, O((n + edges) log n)."""
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while len(a):
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            break
        lo, hi = np.minimum(pa, pb)[differ], np.maximum(pa, pb)[differ]
        np.minimum.at(parent, hi, lo)  # hook each root under the smaller one
        while True:  # pointer jumping: every item straight to its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    return parent


@dataclass(frozen=True)
class Group:
    """Row positions of one group, best first (see `groups`), and `score`: the lowest cosine
    between the first and any other member."""

    rows: np.ndarray
    score: float


def groups(
    vectors: np.ndarray,
    threshold: float,
    order_key: np.ndarray,
    hashes: np.ndarray | None = None,
    max_hash_distance: int = MAX_HASH_DISTANCE,
    **search,
) -> list[Group]:
    """Groups of near-duplicate rows of `vectors`: pairs at cosine >= `threshold` (and, given
    `hashes`, one per row, with hashes at most `max_hash_distance` bits apart), joined
    transitively. Within a group rows are sorted by `order_key` (ascending: the
    caller puts the best first, e.g. minus the pixel count); groups come by score, highest
    first, then by their first row's key."""
    pairs = near_pairs(vectors, threshold, **search)
    pairs = pairs.keep(hash_agrees(pairs, hashes, max_hash_distance))
    label = components(len(vectors), pairs.a, pairs.b)
    members = np.unique(np.concatenate([pairs.a, pairs.b]))
    if not len(members):
        return []
    by_label = members[np.argsort(label[members], kind="stable")]
    cuts = np.flatnonzero(np.diff(label[by_label])) + 1
    out = []
    for rows in np.split(by_label, cuts):
        rows = rows[np.lexsort((rows, order_key[rows]))]
        score = float((vectors[rows[1:]] @ vectors[rows[0]]).min())
        out.append(Group(rows, score))
    out.sort(key=lambda g: (-g.score, order_key[g.rows[0]], int(g.rows[0])))
    return out


@dataclass(frozen=True)
class DuplicateFile:
    path: bytes
    size: int
    width: int | None
    height: int | None


@dataclass(frozen=True)
class DuplicateGroup:
    """Files that are copies of one another, best first (the most pixels, then the largest
    file); `score` is the lowest cosine between the first and any other."""

    modality: str
    files: list[DuplicateFile]
    score: float

    def to_dict(self) -> dict:
        return {
            "paths": [show_path(f.path) for f in self.files],
            "score": round(self.score, 6),
            "modality": self.modality,
        }


@dataclass
class Duplicates:
    """What `find_duplicates` found: the groups, most alike first, and per modality the files
    left out for want of a perceptual hash (indexed by an mmsearch that did not record one)."""

    groups: list[DuplicateGroup] = field(default_factory=list)
    unhashed: dict[str, int] = field(default_factory=dict)


def duplicate_types() -> tuple[str, ...]:
    """The modalities `find_duplicates` compares (see `Modality.duplicate_cosine`)."""
    return tuple(m.name for m in TABLE if m.duplicate_cosine is not None)


def find_duplicates(
    catalog,
    dim: int,
    modality: str = "any",
    threshold: float | None = None,
    max_hash_distance: int = MAX_HASH_DISTANCE,
) -> Duplicates:
    """Groups of near-duplicate files in a catalog, within each modality (`any`: each of
    `duplicate_types()`). Two files are copies when their vectors' cosine reaches `threshold`
    (default: the modality's `duplicate_cosine`) and, for a modality with `duplicate_hash`, their
    perceptual hashes are at most `max_hash_distance` bits apart."""
    found = Duplicates()
    for m in duplicate_types() if modality == "any" else (modality,):
        entry = BY_NAME[m]
        files, vectors = catalog.file_vectors(dim, m)
        hashes = None
        if entry.duplicate_hash:
            has = np.array([f[5] is not None for f in files], bool)
            if not has.all():
                found.unhashed[m] = int((~has).sum())
                files, vectors = [f for f, h in zip(files, has, strict=True) if h], vectors[has]
            hashes = np.array([f[5] for f in files], np.int64)
        if len(files) < 2:
            continue
        size = np.array([f[2] for f in files], np.int64)
        pixels = np.array([(f[3] or 0) * (f[4] or 0) for f in files], np.int64)
        best_first = np.empty(len(files), np.int64)
        best_first[np.lexsort((np.arange(len(files)), -size, -pixels))] = np.arange(len(files))
        cut = entry.duplicate_cosine if threshold is None else threshold
        for g in groups(vectors, cut, best_first, hashes, max_hash_distance):
            members = [DuplicateFile(files[r][0], *files[r][2:5]) for r in g.rows]
            found.groups.append(DuplicateGroup(m, members, g.score))
    found.groups.sort(key=lambda g: -g.score)
    return found
