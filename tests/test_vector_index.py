"""The vector index as users rely on it: exact below the threshold, an IVF index above it whose
top 10 agree with exact search (recall@10 >= 0.95), complete results under filters and large k,
incremental adds and removals, and rebuilds of the same kind after a crash or damage.

Synthetic clustered unit vectors stand in for embeddings; the threshold is lowered so that the
IVF path runs on a few thousand vectors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, make_note

from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, SearchOptions, index_root
from mmsearch.encoders import EncoderIdentity
from mmsearch.errors import UsageError
from mmsearch.pipeline.run import index_paths
from mmsearch.records import FileEntry, Segment
from mmsearch.search import Searcher
from mmsearch.storage.collection import Collection
from mmsearch.storage.vectors import FLAT, VectorIndex, choose_type

DIM = 64
THRESHOLD = 4000


def clustered(n: int, seed: int, dim: int = DIM, clusters: int = 100) -> np.ndarray:
    """Unit vectors around shared cluster centres with a decaying spectrum of spread (queries
    drawn with another seed come from the same distribution but are not stored)."""
    centres = np.random.default_rng(123).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spectrum = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    spectrum /= np.linalg.norm(spectrum)
    rng = np.random.default_rng(seed)
    x = (
        centres[rng.integers(0, clusters, n)]
        + rng.standard_normal((n, dim)).astype(np.float32) * spectrum
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def options(**kw) -> IndexOptions:
    kw.setdefault("exact_below", THRESHOLD)
    return IndexOptions(roots=(), root_dir=index_root(), **kw)


def new_collection(name: str = "default") -> Collection:
    col = Collection.open_writer(index_root(), name)
    col.write_manifest(encoder=EncoderIdentity("synthetic", "synthetic", dim=DIM), name=name)
    return col


def add_units(col: Collection, vectors: np.ndarray, start: int = 0, modality="image") -> list[int]:
    """Catalog rows for `vectors` (one file each), committed; returns their unit ids."""
    ids = []
    with col.catalog.transaction():
        for i, v in enumerate(vectors):
            entry = FileEntry(f"/data/{modality}{start + i}".encode(), modality, 1, 1)
            file_id = col.catalog.add_file(entry, f"h{modality}{start + i}")
            ids += col.catalog.replace_units(file_id, [Segment()], v[None])[1]
    return ids


def populate(n: int, name: str = "default", **kw) -> tuple[np.ndarray, np.ndarray]:
    """An index of n clustered vectors saved as an indexing run saves it; returns (ids, vectors)."""
    vectors = clustered(n, seed=0)
    with new_collection(name) as col:
        _ = col.vectors  # loaded before the rows are committed, as an indexing run does
        ids = np.array(add_units(col, vectors), np.int64)
        col.vectors.add(ids, vectors)
        col.save_vectors(options(**kw))
    return ids, vectors


def manifest(name: str = "default") -> dict:
    return json.loads((index_root() / name / "manifest.json").read_text())


def exact_top(vectors, ids, q, k):
    scores = vectors @ q
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = top[np.argsort(-scores[top], kind="stable")]
    return ids[order], scores[order]


def recall_at_10(vi: VectorIndex, vectors, ids, queries) -> float:
    hits = 0
    for q in queries:
        want, _ = exact_top(vectors, ids, q, 10)
        _, got = vi.search(q, 10)
        hits += len(set(want) & set(got))
    return hits / (10 * len(queries))


def test_below_threshold_the_index_stays_exact():
    ids, vectors = populate(THRESHOLD - 500)
    m = manifest()
    assert m["index_type"] == FLAT and m["vectors"] == len(ids)
    with Collection.open_reader(index_root(), "default") as col:
        vi = col.vectors
        assert vi.exact
        for q in clustered(20, seed=5):
            want, want_scores = exact_top(vectors, ids, q, 10)
            scores, got = vi.search(q, 10)
            assert list(got) == list(want)
            np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_above_threshold_an_ivf_index_keeps_recall_on_fresh_queries():
    ids, vectors = populate(3 * THRESHOLD)
    m = manifest()
    assert m["index_type"].startswith("IVF") and m["index_type"].endswith(",Flat")
    info = m["vector_index"]
    assert 1 <= info["nprobe"] < info["nlist"]  # approximate: not a disguised full scan
    assert info["recall_at_10"] >= 0.95 and info["trained_on"] == len(ids)
    with Collection.open_reader(index_root(), "default") as col:
        vi = col.vectors
        assert vi.index_type == m["index_type"] and vi.nprobe == info["nprobe"]
        queries = clustered(300, seed=99)
        assert recall_at_10(vi, vectors, ids, queries) >= 0.95
        # scores are the cosines themselves
        scores, got = vi.search(queries[0], 10)
        np.testing.assert_allclose(
            scores, vectors[np.searchsorted(ids, got)] @ queries[0], atol=1e-5
        )


def test_filter_and_large_k_return_complete_results():
    ids, vectors = populate(3 * THRESHOLD)
    rng = np.random.default_rng(3)
    allowed = np.sort(rng.choice(ids, 25, replace=False))  # a --type selecting 0.2% of vectors
    with Collection.open_reader(index_root(), "default") as col:
        vi = col.vectors
        assert not vi.exact
        for q in clustered(10, seed=7):
            mask = np.isin(ids, allowed)
            want, _ = exact_top(vectors[mask], ids[mask], q, 10)
            _, got = vi.search(q, 10, allowed)
            assert list(got) == list(want)
            _, got = vi.search(q, 100, allowed)  # more than there are: all of them
            assert sorted(got) == list(allowed)
            want, _ = exact_top(vectors, ids, q, 500)
            _, got = vi.search(q, 500)
            assert set(got) == set(want)
        _, got = vi.search(q, 10**6)
        assert len(got) == len(ids)
        # A broad filter (most vectors pass) whose vectors all lie outside the lists nearest the
        # query: the probed lists hold none of them, and the answer is still complete and exact.
        vi.ivf.nprobe = 4
        _, near = vi.ivf.quantizer.search(q[None], 32)
        _, lists = vi.ivf.quantizer.search(vectors, 1)
        mask = ~np.isin(lists[:, 0], near[0])
        assert mask.mean() > 0.5
        want, _ = exact_top(vectors[mask], ids[mask], q, 10)
        _, got = vi.search(q, 10, ids[mask])
        assert list(got) == list(want)


def test_incremental_adds_and_removals_go_into_the_trained_index():
    ids, vectors = populate(3 * THRESHOLD)
    first = manifest()["vector_index"]
    new = clustered(300, seed=42)
    with Collection.open_writer(index_root(), "default") as col:
        assert not col.vectors.exact
        new_ids = add_units(col, new, start=len(ids))
        col.vectors.add(new_ids, new)
        gone = [int(i) for i in ids[:200]]
        with col.catalog.transaction():
            for uid in gone:
                col.catalog.delete_file(uid)  # one unit per file, file ids follow unit ids
        col.vectors.remove(gone)
        col.save_vectors(options())
    m = manifest()
    assert m["vector_index"]["nlist"] == first["nlist"]  # not retrained
    assert m["vector_index"]["trained_on"] == first["trained_on"]
    assert m["vectors"] == len(ids) + len(new) - len(gone)
    with Collection.open_reader(index_root(), "default") as col:
        vi = col.vectors
        for uid, v in zip(new_ids[:20], new[:20], strict=True):
            scores, got = vi.search(v, 1)
            assert got[0] == uid and scores[0] == pytest.approx(1.0, abs=1e-5)
        for uid, v in zip(gone[:20], vectors[:20], strict=True):
            _, got = vi.search(v, 10)
            assert uid not in got


def test_growth_retrains_and_shrinking_below_the_threshold_goes_exact():
    ids, vectors = populate(THRESHOLD + 500)
    first = manifest()["vector_index"]
    more = clustered(4 * first["trained_on"], seed=8)
    with Collection.open_writer(index_root(), "default") as col:
        _ = col.vectors
        more_ids = add_units(col, more, start=len(ids))
        col.vectors.add(more_ids, more)
        col.save_vectors(options())
    grown = manifest()["vector_index"]
    assert grown["trained_on"] == len(ids) + len(more) and grown["nlist"] > first["nlist"]
    assert grown["recall_at_10"] >= 0.95
    with Collection.open_writer(index_root(), "default") as col:
        _ = col.vectors
        with col.catalog.transaction():
            col.catalog.clear()
        col.vectors.remove(list(ids) + list(more_ids))
        keep_ids = add_units(col, vectors[:100], start=10**6)
        col.vectors.add(keep_ids, vectors[:100])
        col.save_vectors(options())
    assert manifest()["index_type"] == FLAT


def test_index_type_choice_is_kept_between_runs():
    populate(3 * THRESHOLD, index_type="flat")
    assert manifest()["index_type"] == FLAT
    with Collection.open_writer(index_root(), "default") as col:
        _ = col.vectors
        col.save_vectors(options())  # no --index-type: the index's own choice
    assert manifest()["index_type"] == FLAT
    with Collection.open_writer(index_root(), "default") as col:
        _ = col.vectors
        col.save_vectors(options(index_type="auto"))
    assert manifest()["index_type"].startswith("IVF")
    with pytest.raises(UsageError):
        choose_type(10, DIM, "hnsw")


def test_memory_budget_picks_a_scalar_quantised_encoding():
    n, dim = 10_000_000, 512
    assert choose_type(n, dim, memory_budget=64 << 30).endswith(",Flat")
    assert choose_type(n, dim, memory_budget=12 << 30).endswith(",SQfp16")
    assert choose_type(n, dim, memory_budget=6 << 30).endswith(",SQ8")
    assert choose_type(100_000, dim) == FLAT
    assert choose_type(100_000, dim, "ivf").startswith("IVF")
    assert choose_type(100, dim, "ivf") == FLAT  # too few to train lists on


def test_sq8_index_keeps_recall():
    ids, vectors = populate(3 * THRESHOLD, vector_memory=3 * THRESHOLD * (DIM + 8) + 100_000)
    m = manifest()
    assert m["index_type"].endswith(",SQ8")
    assert m["vector_index"]["recall_at_10"] >= 0.95
    with Collection.open_reader(index_root(), "default") as col:
        assert recall_at_10(col.vectors, vectors, ids, clustered(200, seed=99)) >= 0.95


@pytest.mark.parametrize("damage", ["stale", "garbage", "truncated"])
def test_stale_or_damaged_file_is_rebuilt_as_the_same_kind(damage):
    ids, vectors = populate(3 * THRESHOLD)
    m = manifest()
    path = index_root() / "default" / "vectors.faiss"
    extra = clustered(50, seed=11)
    if damage == "stale":  # a run committed rows and was killed before saving the vectors
        with Collection.open_writer(index_root(), "default") as col:
            extra_ids = add_units(col, extra, start=len(ids))
        ids, vectors = np.concatenate([ids, extra_ids]), np.concatenate([vectors, extra])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 1000)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with Collection.open_reader(index_root(), "default") as col:
        vi = col.vectors
        assert vi.index_type == m["index_type"]
        assert vi.ntotal == len(ids)
        assert recall_at_10(vi, vectors, ids, clustered(100, seed=99)) >= 0.95
        if damage == "stale":
            _, got = vi.search(extra[0], 1)
            assert got[0] == ids[-len(extra)]


def test_end_to_end_indexing_above_a_lowered_threshold(tiny_model, tmp_path):
    root = tmp_path / "files"
    for i in range(400):
        make_image(root / f"img{i:03d}.png", pattern=i, size=(32, 32))
    make_note(root / "note.txt", "a red square on a blue field")
    opts = IndexOptions(
        roots=(root,),
        root_dir=index_root(),
        encoder=EncoderOptions(model=ModelSpec.parse(str(tiny_model)), precision="fp32"),
        workers=0,
        exact_below=300,
    )
    report = index_paths(opts)
    assert report.vectors == 401
    m = manifest()
    assert m["index_type"].startswith("IVF") and m["vector_index"]["recall_at_10"] >= 0.95
    with Searcher(SearchOptions(root_dir=index_root())) as s:
        ids, vecs = map(np.concatenate, zip(*s.col.catalog.vector_batches(s.col.dim), strict=True))
        assert not s.col.vectors.exact
        queries = [s.query_vector("red square"), vecs[7], vecs[123]]
        for q in queries:
            hits = s.rank(q, 5)
            want, want_scores = exact_top(vecs, ids, q, 5)
            units = s.col.catalog.units(want)
            assert [h.path for h in hits] == [units[int(u)].path for u in want]
            np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-5)
        notes = s.search("red square", k=5, modality="text")  # 1 of 401 vectors: still found
        assert [Path(os.fsdecode(h.path)).name for h in notes] == ["note.txt"]
