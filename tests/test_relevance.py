"""Calibrated relevance: comparable across modalities, monotone within one, "nothing found" as an
answer, stored with the index and refitted when it changes.

The ranking logic is checked on synthetic vectors with a planted modality gap (random towers have
none); the plumbing (stored file, refit, CLI flags, old indexes) with the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.config import SearchOptions, index_root
from mmsearch.search import Searcher
from mmsearch.storage import calibration
from mmsearch.storage.collection import Collection

D, TOPICS = 48, 12


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def world():
    """Photos of 12 topics and notes of the first 6, in one space with a modality gap: every
    note shares a large 'text' component with a text query, so any note scores 0.45-0.95 against
    it, while a photo of the query's topic scores about 0.35 and other photos about 0."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(D, D)))[0]
    text_c, image_c, topics = basis[0], basis[1], basis[2:]

    def make(center, c, b, topic, noise):
        topic = np.atleast_1d(topic)
        noise = noise * rng.normal(size=(len(topic), D)) / np.sqrt(D)
        return _unit(c * center + b * topics[topic] + noise)

    image_topic, text_topic = np.arange(300) % TOPICS, np.arange(300) % (TOPICS // 2)
    images = make(image_c, 0.6, 0.6, image_topic, 0.5)
    texts = make(text_c, 0.8, 0.45, text_topic, 0.4)
    cal = calibration.fit({"image": images, "text": texts}, {"image": 300, "text": 300}, "m")

    def query(topic):
        return make(text_c, 0.8, 0.6, topic, 0.2)[0]

    return dict(images=images, texts=texts, image_topic=image_topic, text_topic=text_topic,
                cal=cal, query=query)  # fmt: skip


def top_k(w, q, k=10):
    """Each modality's top k (scores, ids); note ids are offset by 1000."""
    out = {}
    for m, vecs, offset in (("image", w["images"], 0), ("text", w["texts"], 1000)):
        s = vecs @ q
        order = np.argsort(-s)[:k]
        out[m] = (s[order], order + offset)
    return out


def test_relevance_is_monotone_in_the_score_within_a_modality_and_in_0_1(world):
    for topic in (0, 3, 8, TOPICS + 2):
        q = world["query"](topic)
        for m, vecs in (("image", world["images"]), ("text", world["texts"])):
            s = np.sort(vecs @ q)
            rel = world["cal"].score(q, "text", m, s)
            assert np.all(np.diff(rel) >= 0)
            assert rel.min() >= 0 and rel.max() <= 1


def test_any_ranking_is_not_dominated_by_the_high_cosine_modality(world):
    q = world["query"](8)  # a topic with photos and no notes
    found = top_k(world, q)
    raw = sorted((s, m) for m, (scores, _) in found.items() for s in scores)[-10:]
    assert {m for _, m in raw} == {"text"}  # the planted gap: by cosine, notes take every place
    hits = world["cal"].merge(q, "text", found, 10)
    assert [m for _, _, _, m in hits] == ["image"] * 10
    assert all(world["image_topic"][i] == 8 for _, _, i, _ in hits)


def test_each_modality_still_surfaces_its_best(world):
    q = world["query"](3)  # photos and notes of this topic
    hits = world["cal"].merge(q, "text", top_k(world, q), 10)
    kinds = [m for _, _, _, m in hits]
    assert kinds.count("image") >= 3 and kinds.count("text") >= 3
    topic = {"image": world["image_topic"], "text": world["text_topic"]}
    assert all(topic[m][i % 1000] == 3 for _, _, i, m in hits)
    assert [r for r, *_ in hits] == sorted((r for r, *_ in hits), reverse=True)


def test_min_relevance_drops_absent_concepts_and_keeps_present_ones(world):
    absent = world["query"](TOPICS + 5)  # a topic no photo or note is about
    assert world["cal"].merge(absent, "text", top_k(world, absent), 10, 0.5) == []
    for topic in (3, 8):
        q = world["query"](topic)
        kept = world["cal"].merge(q, "text", top_k(world, q), 10, 0.5)
        assert len(kept) == 10 and all(r >= 0.5 for r, *_ in kept)


def test_calibration_file_round_trip(world):
    cal = calibration.Calibration.from_bytes(world["cal"].to_bytes())
    q = world["query"](3)
    for m, vecs in (("image", world["images"]), ("text", world["texts"])):
        np.testing.assert_array_equal(
            cal.score(q, "text", m, vecs @ q), world["cal"].score(q, "text", m, vecs @ q)
        )


def test_refit_when_a_modality_changes_by_more_than_a_fifth(world):
    cal = world["cal"]
    assert not cal.stale({"image": 300, "text": 300}, "m")
    assert not cal.stale({"image": 360, "text": 250}, "m")
    assert cal.stale({"image": 361, "text": 300}, "m")
    assert cal.stale({"image": 300, "text": 239}, "m")
    assert cal.stale({"image": 300, "text": 300, "audio": 5}, "m")
    assert cal.stale({"image": 300, "text": 300}, "other model")


def test_a_modality_of_one_vector_still_gets_relevance():
    rng = np.random.default_rng(1)
    images, note = _unit(rng.normal(size=(40, 16))), _unit(rng.normal(size=(1, 16)))
    cal = calibration.fit({"image": images, "text": note}, {"image": 40, "text": 1}, "m")
    q = _unit(rng.normal(size=16))
    for m, vecs in (("image", images), ("text", note)):
        assert np.all(np.isfinite(cal.score(q, "text", m, vecs @ q)))


# --- with an index ------------------------------------------------------------------------------
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def hits_of(r) -> list[dict]:
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.fixture
def indexed(tiny_model, media):
    r = cli("index", media, "--model", tiny_model, "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    return media


def stored(name: str = "default") -> tuple[dict, bool]:
    """The manifest's relevance entry and whether the calibration file is there."""
    with Collection.open_reader(index_root(), name) as col:
        return col.manifest.relevance, (col.data_dir / calibration.FILE).is_file()


def test_every_hit_has_relevance_and_any_ranks_by_it(indexed):
    r = cli("search", "The dog ran after a ball", "--json")
    assert r.exit_code == 0, r.output
    hits = hits_of(r)
    assert len(hits) == 6 and {h["modality"] for h in hits} == {"image", "text"}
    rels = [h["relevance"] for h in hits]
    assert all(0 <= x <= 1 for x in rels) and rels == sorted(rels, reverse=True)
    table = cli("search", "The dog ran after a ball", "-k", "1").stdout.split()
    assert table[:3] == ["1", f"{rels[0]:.2f}", f"{hits[0]['score']:.3f}"]


@pytest.mark.parametrize("query", [["The dog ran after a ball"], ["--image", "photos/p1.jpg"]])
def test_min_relevance_keeps_what_reaches_it_and_exits_1_when_nothing_does(indexed, query):
    query = [indexed / a if a.endswith(".jpg") else a for a in query]
    rels = [h["relevance"] for h in hits_of(cli("search", *query, "--json"))]
    assert len(set(rels)) > 1 and rels[0] < 1
    cut = (rels[0] + rels[-1]) / 2
    r = cli("search", *query, "--json", "--min-relevance", cut)
    assert r.exit_code == 0
    assert [h["relevance"] for h in hits_of(r)] == [x for x in rels if x >= cut]
    r = cli("search", *query, "--min-relevance", (rels[0] + 1) / 2)
    assert r.exit_code == 1 and r.stdout == ""
    assert "no results with relevance >=" in r.stderr


def test_min_relevance_outside_0_1_is_refused(indexed):
    r = cli("search", "dog", "--min-relevance", "1.5")
    assert r.exit_code == 2 and "--min-relevance" in r.stderr


def test_calibration_is_stored_with_the_index_and_survives_reopening(indexed):
    entry, present = stored()
    assert present and entry["fitted_on"] == {"image": 5, "text": 1}
    first = hits_of(cli("search", "beach", "--json"))
    again = cli("search", "beach", "--json")
    assert hits_of(again) == first and "calibration" not in again.stderr


def test_refitted_when_the_index_grows_by_more_than_a_fifth(indexed, tiny_model):
    make_image(indexed / "photos" / "more" / "m0.png", pattern=20)  # 5 -> 6 photos: +20%
    assert cli("index", indexed, "--workers", "0").exit_code == 0
    assert stored()[0]["fitted_on"] == {"image": 5, "text": 1}
    make_image(indexed / "photos" / "more" / "m1.png", pattern=21)  # 7 photos: +40%
    assert cli("index", indexed, "--workers", "0").exit_code == 0
    assert stored()[0]["fitted_on"] == {"image": 7, "text": 1}


def test_an_index_without_calibration_still_searches_and_the_next_run_stores_one(indexed):
    with Collection.open_writer(index_root(), "default") as col:
        (col.data_dir / calibration.FILE).unlink()
        col.write_manifest(relevance=None)
    r = cli("search", "The dog ran after a ball", "--json")
    assert r.exit_code == 0 and "no stored relevance calibration" in r.stderr
    assert all(0 <= h["relevance"] <= 1 for h in hits_of(r))
    with Searcher(SearchOptions()) as s:  # the library answers the same, without printing
        assert [h.relevance for h in s.search("The dog ran after a ball")] == pytest.approx(
            [h["relevance"] for h in hits_of(r)], abs=1e-4
        )
    assert cli("index", indexed, "--workers", "0").exit_code == 0  # nothing new to embed
    assert stored()[1]
    assert "calibration" not in cli("search", "The dog ran after a ball").stderr


def test_a_damaged_calibration_file_is_refitted_not_fatal(indexed):
    with Collection.open_reader(index_root(), "default") as col:
        path = col.data_dir / calibration.FILE
    path.write_bytes(path.read_bytes()[:100])
    r = cli("search", "beach", "--json")
    assert r.exit_code == 0 and "no stored relevance calibration" in r.stderr
    assert cli("index", indexed, "--workers", "0").exit_code == 0
    assert calibration.Calibration.from_bytes(path.read_bytes()).counts == {"image": 5, "text": 1}
