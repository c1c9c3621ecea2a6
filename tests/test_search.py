"""Query arithmetic and ranking."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, make_note

from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, SearchOptions, index_root
from mmsearch.errors import IndexNotFoundError, UsageError
from mmsearch.pipeline.run import index_paths
from mmsearch.search import Searcher, Term, combine, parse_query


def test_parse_query():
    assert parse_query("beach + sunset - people") == [
        Term(1.0, "beach"),
        Term(1.0, "sunset"),
        Term(-1.0, "people"),
    ]
    assert parse_query("2:sunset + beach") == [Term(2.0, "sunset"), Term(1.0, "beach")]
    assert parse_query("a t-shirt") == [Term(1.0, "a t-shirt")]
    assert parse_query("beach - 0.5:people") == [Term(1.0, "beach"), Term(-0.5, "people")]
    assert parse_query("-1.5:night + day") == [Term(-1.5, "night"), Term(1.0, "day")]
    assert parse_query("x+y") == [Term(1.0, "x+y")]


def test_parse_query_rejects_empty_terms():
    with pytest.raises(UsageError):
        parse_query("beach + ")


def test_combine_is_normalised_weighted_sum_of_unit_vectors():
    a, b = np.array([3.0, 0.0], np.float32), np.array([0.0, 0.5], np.float32)
    q = combine([a, b], [2.0, 1.0])
    np.testing.assert_allclose(q, np.array([2, 1]) / np.sqrt(5), rtol=1e-6)
    with pytest.raises(UsageError, match="cancel"):
        combine([a, a], [1.0, -1.0])


@pytest.fixture
def indexed(tiny_model, tmp_path):
    root = tmp_path / "m"
    for i in range(5):
        make_image(root / f"img{i}.png", pattern=i)
    make_note(root / "dogs.md", "a dog running on the beach")
    make_note(root / "cats.md", "a cat sleeping on a sofa")
    index_paths(
        IndexOptions(
            roots=(root,),
            root_dir=index_root(),
            encoder=EncoderOptions(model=ModelSpec.parse(str(tiny_model)), precision="fp32"),
            workers=0,
        )
    )
    return root


def names(hits):
    return [Path(os.fsdecode(h.path)).name for h in hits]


def test_text_finds_the_note_with_that_text(indexed):
    with Searcher(SearchOptions()) as s:
        hits = s.search("a dog running on the beach", k=3)
    assert names(hits)[0] == "dogs.md" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits == sorted(hits, key=lambda h: -h.relevance)


def test_image_finds_itself_first_and_type_filters(indexed):
    with Searcher(SearchOptions()) as s:
        hits = s.search(image=indexed / "img3.png", k=3, modality="image")
        assert names(hits)[0] == "img3.png" and hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert all(h.modality == "image" for h in hits)
        text_only = s.search(image=indexed / "img3.png", k=10, modality="text")
        assert sorted(names(text_only)) == ["cats.md", "dogs.md"]


def test_k_larger_than_index_returns_everything(indexed):
    with Searcher(SearchOptions()) as s:
        assert len(s.search("anything", k=1000)) == 7


def test_arithmetic_matches_manual_combination(indexed):
    with Searcher(SearchOptions()) as s:
        q = s.query_vector("2:dog + beach - cat")
        parts = s.embed_texts(["dog", "beach", "cat"])
        np.testing.assert_allclose(q, combine(list(parts), [2, 1, -1]), atol=1e-5)
        hits = s.search("2:dog + beach - cat", k=7)
        scores = s.col.vectors.search(q, 7)[0]
        # every item, ranked by relevance: the same cosines as the combined vector's
        np.testing.assert_allclose(sorted(h.score for h in hits), sorted(scores), atol=1e-6)


def test_text_plus_image_query(indexed):
    with Searcher(SearchOptions()) as s:
        q = s.query_vector("a dog", image=indexed / "img1.png")
        expected = combine(
            [s.embed_texts(["a dog"])[0], s.embed_image(indexed / "img1.png")], [1, 1]
        )
        np.testing.assert_allclose(q, expected, atol=1e-5)


def test_search_errors(indexed, tmp_path):
    with Searcher(SearchOptions()) as s:
        with pytest.raises(UsageError, match="nothing to search"):
            s.search("")
        with pytest.raises(UsageError, match="not found"):
            s.search(image=tmp_path / "nope.jpg")
        with pytest.raises(UsageError, match="--type"):
            s.search("x", modality="hologram")
    with pytest.raises(IndexNotFoundError, match="no index named 'other'"):
        Searcher(SearchOptions(name="other"))


def _use_engine(monkeypatch, device: str | None) -> None:
    """Searches answered by the torch engine on `device` (None: faiss on the CPU)."""
    from mmsearch.storage.vectors import engine

    chosen = engine.Engine() if device is None else engine.Engine(engine.TORCH, device=device)
    monkeypatch.setattr(engine, "choose", lambda *a: chosen)


def _torch_answers(monkeypatch, device: str, options: SearchOptions, queries) -> list:
    import mmsearch.storage.vectors.torch_exact

    _use_engine(monkeypatch, device)
    with Searcher(options) as s:
        out = [s.search(q, k=k, modality=m) for q, k, m in queries]
        assert isinstance(s._vectors(), mmsearch.storage.vectors.torch_exact.TorchExactIndex)
    return out


QUERIES = [("a dog", 3, "any"), ("a cat", 50, "any"), ("a dog", 2, "image"), ("sofa", 5, "text")]


def test_torch_search_gives_the_faiss_answers(indexed, monkeypatch):
    """The exact torch path (used on GPUs) run on the CPU: same hits, same scores."""
    with Searcher(SearchOptions()) as s:
        expected = [s.search(q, k=k, modality=m) for q, k, m in QUERIES]
    got = _torch_answers(monkeypatch, "cpu", SearchOptions(), QUERIES)
    for want, have in zip(expected, got, strict=True):
        assert names(have) == names(want)
        assert [h.score for h in have] == pytest.approx([h.score for h in want], abs=1e-5)
    assert names(got[2]) and all(h.modality == "image" for h in got[2])


@pytest.mark.gpu
def test_torch_search_on_cuda_gives_the_faiss_answers(indexed, monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with Searcher(SearchOptions(device="cuda")) as s:
        assert s.engine.name in ("faiss-gpu", "torch"), s.engine
    with Searcher(SearchOptions(device="cpu")) as s:
        expected = [s.search(q, k=k, modality=m) for q, k, m in QUERIES]
    got = _torch_answers(monkeypatch, "cuda", SearchOptions(device="cuda"), QUERIES)
    for want, have in zip(expected, got, strict=True):
        assert names(have) == names(want)
        assert [h.score for h in have] == pytest.approx([h.score for h in want], abs=1e-5)


@pytest.mark.parametrize("device", [None, "cpu"])  # faiss, and the exact torch path
def test_a_clone_answers_in_another_thread(indexed, monkeypatch, device):
    """A server's request threads search through clones (SQLite connections belong to the
    thread that opened them): the same hits as the Searcher they were cloned from."""
    import threading

    _use_engine(monkeypatch, device)
    with Searcher(SearchOptions()) as s:
        s.warm()
        expected = [s.search(q, k=k, modality=m) for q, k, m in QUERIES]
        got = []

        def other_thread():
            with s.clone() as c:
                got.extend(c.search(q, k=k, modality=m) for q, k, m in QUERIES)
                assert c.col.catalog is not s.col.catalog and c.col.vectors is s.col.vectors

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert got == expected
        assert [s.search(q, k=k, modality=m) for q, k, m in QUERIES] == expected  # still open


def test_a_reopened_searcher_keeps_the_towers_of_the_same_model(indexed, other_model):
    """A server reopens an index that an index run changed: the towers it loaded are kept
    while the model is the same, and dropped when a rebuild changed the model."""
    with Searcher(SearchOptions()) as s:
        dog = s.search("a dog")
        with Searcher(SearchOptions(), towers_from=s) as again:
            assert again._text is s._text and again._text is not None
            assert again.search("a dog") == dog
        index_paths(
            IndexOptions(
                roots=(indexed,),
                root_dir=index_root(),
                encoder=EncoderOptions(model=ModelSpec.parse(str(other_model)), precision="fp32"),
                workers=0,
                rebuild=True,
            )
        )
        with Searcher(SearchOptions(), towers_from=s) as again:
            assert again._text is None and again._full is None
            assert [h.score for h in again.search("a dog")] != [h.score for h in dog]


def test_cold_search_does_not_pick_torch():
    """In a fresh process (a CLI search), auto neither imports torch nor searches with a GPU."""
    import subprocess
    import sys

    code = (
        "import sys; from mmsearch.storage.vectors.engine import choose, probe, FAISS_CPU; "
        "assert choose('auto', 'IDMap2,FlatIP', 10, 4, probe('auto', False)).name == FAISS_CPU; "
        "assert choose('cpu', 'IDMap2,FlatIP', 10, 4, probe('cpu', True)).name == FAISS_CPU; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_sum_that_nearly_cancels_is_refused():
    """'dog - dog' from two rows of a batch that differ in their last bits: the leftover vector is
    rounding noise, not a direction."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal(32).astype(np.float32)
    v /= np.linalg.norm(v)
    nearly = v + 1e-5 * rng.standard_normal(32).astype(np.float32)
    with pytest.raises(UsageError, match="cancel"):
        combine([v, nearly], [1.0, -1.0])
    with pytest.raises(UsageError, match="cancel"):
        combine([v, nearly, v], [2.0, -1.0, -1.0])
    np.testing.assert_allclose(combine([v, nearly], [1.0, -0.5]), v, atol=1e-4)  # half is left


def test_dog_minus_dog_is_refused_like_cat_minus_cat(indexed, monkeypatch):
    with Searcher(SearchOptions()) as s:
        embed = s.embed_texts

        def batch_noise(texts):
            # as a real tower in a batch: each row a little different from the same text alone
            out = embed(texts)
            return out + 1e-5 * np.arange(1, len(texts) + 1, dtype=np.float32)[:, None]

        monkeypatch.setattr(s, "embed_texts", batch_noise)
        for query in (
            "cat - cat",
            "dog - dog",
            "2:dog - dog - dog",
            "a dog + beach - a dog - beach",
        ):
            with pytest.raises(UsageError, match="cancel"):
                s.search(query)
        assert s.search("dog - 0.5:dog", k=1)


def test_query_files_are_checked_before_a_model_loads(indexed, tmp_path, monkeypatch):
    import mmsearch.encoders

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(mmsearch.encoders, "create_encoder", refuse)
    with Searcher(SearchOptions()) as s:
        with pytest.raises(UsageError, match=r"query image .* is a directory, not an image file"):
            s.search("a dog", image=tmp_path)
        with pytest.raises(UsageError, match=r"is a directory, not a sound file"):
            s.search("a dog", audio=tmp_path)
        with pytest.raises(UsageError, match="query file not found"):
            s.search("a dog", image=tmp_path / "nope.jpg")


def test_library_imports_as_documented():
    """`from mmsearch import search, Searcher` in a fresh process (it used to recurse)."""
    import subprocess
    import sys

    code = (
        "from mmsearch import Searcher, search; from mmsearch.search import parse_query; "
        "import mmsearch; assert mmsearch.search is search and search.__module__ == "
        "'mmsearch.search.searcher' and callable(search) and Searcher.__name__ == 'Searcher'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
