"""Near-duplicates: planted copies are grouped and nothing else is, with the exact pass and the
k-means-cell pass alike; a group lists its best file first; photos' perceptual hashes veto
look-alikes; `mmsearch duplicates` on a real index, and on one written before hashes existed."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from conftest import make_photo, smooth_picture
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.encoders import EncoderIdentity
from mmsearch.search.duplicates import components, groups, near_pairs

runner = CliRunner()
DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def away(x: np.ndarray, amount: float, rng) -> np.ndarray:
    """Rows of x moved by `amount` in a random direction orthogonal to each (so the cosine to
    where they started is exactly 1/sqrt(1 + amount^2))."""
    u = rng.standard_normal(x.shape)
    u -= (u * x).sum(-1, keepdims=True) * x
    return unit(x + amount * unit(u))


def planted(n: int, copies: int, seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    """n vectors in scenes of ~5 (cosine 0.8 +- 0.03 within a scene), of which `copies` rows
    are near-copies (cosine 0.97) of other rows; returns the vectors and the planted groups."""
    rng = np.random.default_rng(seed)
    scenes = unit(rng.standard_normal((n // 5, DIM)))
    x = away(scenes[rng.integers(0, len(scenes), n)], 0.5, rng)
    rows = rng.permutation(n)
    originals, targets = rows[:copies], rows[copies : 2 * copies]
    x[targets] = away(x[originals], 0.25, rng)
    return x, [{int(a), int(b)} for a, b in zip(originals, targets, strict=True)]


def found(vectors, threshold=0.93, **kw) -> list[set[int]]:
    key = np.arange(len(vectors))
    return [set(g.rows.tolist()) for g in groups(vectors, threshold, key, **kw)]


@pytest.mark.parametrize("exact_below", [10**9, 0], ids=["exact", "cells"])
def test_planted_copies_are_grouped_and_nothing_else(exact_below):
    x, truth = planted(3000, 40)
    scene_pairs = near_pairs(x, 0.7).score
    assert len(scene_pairs) > 1000  # distinct rows of one scene do look alike
    got = found(x, exact_below=exact_below)
    assert sorted(map(sorted, got)) == sorted(map(sorted, truth))


def test_transitive_copies_form_one_group_and_many_identical_ones_too():
    x, _ = planted(500, 0)
    base = x[0]
    x[1] = away(base, 0.3, np.random.default_rng(1))
    x[2] = away(x[1], 0.3, np.random.default_rng(2))
    x[100:140] = x[50]  # 41 identical vectors: more than a row's 16 neighbours
    got = found(x)
    assert {0, 1, 2} in got and set(range(100, 140)) | {50} in got and len(got) == 2


def test_components_is_union_find():
    labels = components(7, np.array([0, 1, 5, 3]), np.array([1, 2, 6, 1]))
    assert list(labels) == [0, 0, 0, 0, 4, 5, 5]
    assert list(components(3, np.zeros(0, int), np.zeros(0, int))) == [0, 1, 2]


def test_group_lists_the_best_first_and_scores_its_weakest_member():
    x, _ = planted(200, 0)
    x[7] = away(x[3], 0.1, np.random.default_rng(5))
    x[9] = away(x[3], 0.3, np.random.default_rng(6))
    key = np.arange(200)
    key[9] = -1  # the caller's order: row 9 first (say, the most pixels)
    (g,) = groups(x, 0.9, key)
    assert list(g.rows) == [9, 3, 7]
    assert g.score == pytest.approx(min(x[9] @ x[3], x[9] @ x[7]), abs=1e-6)


def test_hashes_far_apart_keep_look_alikes_apart():
    x, truth = planted(400, 5)
    hashes = np.arange(400, dtype=np.int64) * 0  # all alike...
    a, b = sorted(truth[0])
    hashes[b] = -1  # ...but one of the copies: 64 bits away
    got = found(x, hashes=hashes, max_hash_distance=8)
    assert {a, b} not in got and len(got) == 4


# --- the command -----------------------------------------------------------------------------
def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def jpeg(img, path, quality=90, scale=1.0):
    if scale != 1.0:
        img = img.resize((int(img.width * scale), int(img.height * scale)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=quality)
    return path


@pytest.fixture
def photos(tmp_path):
    """Six distinct photos, a resized quality-35 re-encoding of one, and a byte-identical copy."""
    root = tmp_path / "photos"
    for i in range(6):
        make_photo(root / f"p{i}.jpg", seed=i, size=(160, 120))
    jpeg(smooth_picture(2, (160, 120)), root / "small" / "p2-small.jpg", quality=35, scale=0.5)
    (root / "copy").mkdir()
    (root / "copy" / "p2.jpg").write_bytes((root / "p2.jpg").read_bytes())
    return root


def test_duplicates_command_groups_copies_best_first(photos, tiny_model):
    assert cli("index", photos, "--model", tiny_model).exit_code == 0
    r = cli("duplicates", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["modality"] == "image"
    paths = rows[0]["paths"]
    # the two full-size files first (same pixels, same bytes), the half-size re-encode last
    assert sorted(paths[:2]) == sorted([str(photos / "p2.jpg"), str(photos / "copy" / "p2.jpg")])
    assert paths[2] == str(photos / "small" / "p2-small.jpg")
    assert 0 < rows[0]["score"] <= 1
    table = cli("duplicates")
    assert table.exit_code == 0
    assert "group 1: 3 image files" in table.stdout and "160x120" in table.stdout
    assert "80x60" in table.stdout


def test_no_duplicates_exits_1_and_a_strict_threshold_finds_fewer(photos, tiny_model, tmp_path):
    assert cli("index", photos, "--model", tiny_model).exit_code == 0
    r = cli("duplicates", "--threshold", "1.0", "--json")  # only byte-identical vectors
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and len(rows) == 1 and len(rows[0]["paths"]) == 2
    assert cli("duplicates", "--type", "audio").exit_code == 1
    strict = cli("duplicates", "--max-hash-distance", "0", "--json")  # equal hashes only
    (row,) = [json.loads(line) for line in strict.stdout.splitlines()]
    assert str(photos / "copy" / "p2.jpg") in row["paths"]
    bad = cli("duplicates", "--type", "text")
    assert bad.exit_code == 2 and "text" in bad.output


def _as_an_old_catalog(home) -> None:
    """Make the index look written by an mmsearch before FileMeta: its columns dropped."""
    (catalog,) = home.rglob("catalog.sqlite")
    db = sqlite3.connect(catalog)
    for column in ("taken", "phash", "width", "height"):
        db.execute(f"ALTER TABLE files DROP COLUMN {column}")
    db.commit()
    db.close()


def test_an_index_from_before_hashes_searches_then_gets_them_without_reembedding(
    photos, tiny_model, home
):
    assert cli("index", photos, "--model", tiny_model).exit_code == 0
    before = cli("search", "--image", photos / "p1.jpg", "--json").stdout
    _as_an_old_catalog(home)
    # it still opens and answers, the same
    assert cli("search", "--image", photos / "p1.jpg", "--json").stdout == before
    r = cli("duplicates")
    assert r.exit_code == 1 and "8 image files have no perceptual hash" in r.output
    # the next run reads the photos again for their hash, date and size: nothing re-embedded
    r = cli("index", photos, "--json")
    report = json.loads(r.stdout)
    assert report["unchanged"] == 8 and report["added"] == report["updated"] == 0
    assert cli("search", "--image", photos / "p1.jpg", "--json").stdout == before
    rows = [json.loads(line) for line in cli("duplicates", "--json").stdout.splitlines()]
    assert len(rows) == 1 and len(rows[0]["paths"]) == 3
    assert cli("index", photos, "--json").exit_code == 0  # and only once


def test_same_content_reuses_meta_with_the_vectors(photos, tiny_model, tmp_path):
    """A copy indexed later reuses the stored vectors of its twin, and its hash and size too."""
    assert cli("index", photos, "--model", tiny_model).exit_code == 0
    (photos / "later").mkdir()
    (photos / "later" / "p4.jpg").write_bytes((photos / "p4.jpg").read_bytes())
    assert cli("index", photos).exit_code == 0
    rows = [json.loads(line) for line in cli("duplicates", "--json").stdout.splitlines()]
    assert sorted(len(r["paths"]) for r in rows) == [2, 3]


def test_recordings_are_compared_by_their_mean_window(home):
    """A recording is many window vectors: two files whose windows match (a re-encode) are
    copies; one that shares a single window with them (a quote) is not. Vectors alone decide
    (recordings have no perceptual hash)."""
    from mmsearch.config import index_root
    from mmsearch.records import FileEntry, Segment
    from mmsearch.search.duplicates import find_duplicates
    from mmsearch.storage.collection import Collection

    rng = np.random.default_rng(0)
    windows = unit(rng.standard_normal((6, DIM)))
    files = {
        "a.wav": windows,
        "a.flac": away(windows, 0.1, rng),  # every window a little off
        "quote.wav": np.concatenate([windows[:1], unit(rng.standard_normal((5, DIM)))]),
        "other.wav": unit(rng.standard_normal((6, DIM))),
    }
    with Collection.open_writer(index_root(), "default") as col:
        col.write_manifest(encoder=EncoderIdentity("synthetic", "synthetic", dim=DIM))
        with col.catalog.transaction():
            for i, (name, vecs) in enumerate(files.items()):
                entry = FileEntry(f"/rec/{name}".encode(), "audio", 1000 + i, 1)
                fid = col.catalog.add_file(entry, f"h{i}")
                segments = [Segment(7.5 * w, 7.5 * w + 10) for w in range(len(vecs))]
                col.catalog.replace_units(fid, segments, vecs)
    with Collection.open_reader(index_root(), "default") as col:
        found = find_duplicates(col.catalog, DIM, "audio")
        assert [[f.path for f in g.files] for g in found.groups] == [
            [b"/rec/a.flac", b"/rec/a.wav"]
        ]
        assert found.groups[0].score > 0.95 and not found.unhashed
        assert find_duplicates(col.catalog, DIM, "any").groups == found.groups
        assert find_duplicates(col.catalog, DIM, "image").groups == []
