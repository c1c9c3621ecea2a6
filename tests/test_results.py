"""Readable results: a note hit shows its matching lines (and none once the note has changed),
--group gives one row per file with the others counted, --exclude-self leaves out the query file
and its byte-identical copies, and each still returns k rows."""

from __future__ import annotations

import json

import pytest
from conftest import make_note, make_photo
from PIL import Image
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.search.results import SNIPPET_CHARS, SNIPPET_LINES

runner = CliRunner()
WORDS = "river stone bridge lantern harbor meadow violin candle orchard summit".split()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def long_note(seed: int, lines: int = 30) -> str:
    out = []
    for i in range(lines):
        out.append(" ".join(WORDS[(seed + i * j) % len(WORDS)] for j in range(1, 9)) + f" {i}")
    return "\n".join(out) + "\n"


@pytest.fixture
def notes(tmp_path, tiny_model):
    root = tmp_path / "notes"
    make_note(root / "a.md", long_note(1))
    make_note(root / "b.md", long_note(2))
    make_note(root / "wide.txt", "short\n" + "x" * (SNIPPET_CHARS + 50) + "\n")
    assert cli("index", root, "--model", tiny_model).exit_code == 0
    return root


def test_note_hits_carry_their_lines(notes):
    hits = rows(cli("search", "harbor lantern", "--type", "text", "-k", "50", "--json"))
    assert len({h["path"] for h in hits}) == 3 and len(hits) > 3  # chunks of long notes
    for h in hits:
        lines = open(h["path"]).read().splitlines()
        want = lines[h["start"] - 1 : min(h["end"], h["start"] + SNIPPET_LINES - 1)]
        want = [w if len(w) <= SNIPPET_CHARS else w[:SNIPPET_CHARS] + "…" for w in want]
        assert h["snippet"] == want
    table = cli("search", "harbor lantern", "--type", "text", "-k", "1").stdout.splitlines()
    first = hits[0]
    assert table[1] == f"{first['start']:>10}: {first['snippet'][0]}"


def test_a_changed_note_shows_no_stale_lines(notes):
    with open(notes / "a.md", "a") as f:
        f.write("a line added after indexing\n")
    hits = rows(cli("search", "harbor", "--type", "text", "-k", "50", "--json"))
    assert all(("snippet" in h) == (not h["path"].endswith("a.md")) for h in hits)


def test_group_gives_one_row_per_file_with_the_others_counted(notes):
    hits = rows(cli("search", "violin", "--type", "text", "-k", "50", "--json"))
    folded = 0
    for k in (50, 2):
        grouped = rows(cli("search", "violin", "--type", "text", "-k", k, "--group", "--json"))
        files = list(dict.fromkeys(h["path"] for h in hits))[:k]
        assert [g["path"] for g in grouped] == files and [g["rank"] for g in grouped] == [
            *range(1, len(files) + 1)
        ]
        floor = grouped[-1]["score"]
        for g in grouped:
            best = next(h for h in hits if h["path"] == g["path"])
            assert (g["start"], g["end"], g["score"]) == (best["start"], best["end"], best["score"])
            # its other passages that score at least as high as the last row shown
            assert (
                g["more"] == sum(h["path"] == g["path"] and h["score"] >= floor for h in hits) - 1
            )
            folded += g["more"]
    assert folded > 0  # not vacuous: passages were folded
    table = cli("search", "violin", "--type", "text", "-k", "50", "--group").stdout
    shown = [line for line in table.splitlines() if "more)" in line]
    assert (
        len(shown)
        == sum(
            g["more"] > 0
            for g in rows(
                cli("search", "violin", "--type", "text", "-k", "50", "--group", "--json")
            )
        )
        > 0
    )


def test_exclude_self_drops_the_query_and_its_exact_copies(tmp_path, tiny_model):
    root = tmp_path / "photos"
    for i in range(5):
        make_photo(root / f"p{i}.jpg", seed=i)
    (root / "copy.jpg").write_bytes((root / "p1.jpg").read_bytes())
    Image.open(root / "p1.jpg").resize((80, 60)).save(root / "small.jpg", quality=40)
    assert cli("index", root, "--model", tiny_model).exit_code == 0
    query = root / "p1.jpg"
    plain = [h["path"] for h in rows(cli("search", "--image", query, "-k", "7", "--json"))]
    assert {plain[0], plain[1]} == {str(query), str(root / "copy.jpg")}  # cosine 1
    r = cli("search", "--image", query, "--exclude-self", "-k", "5", "--json")
    assert [h["path"] for h in rows(r)] == plain[2:7] and len(plain[2:7]) == 5
    assert str(root / "small.jpg") in plain[2:7]  # a resized copy is not a byte-identical one
    # a query file from outside the index: its copies inside go all the same
    outside = tmp_path / "q.jpg"
    outside.write_bytes(query.read_bytes())
    r = cli("search", "--image", outside, "--exclude-self", "-k", "5", "--json")
    assert [h["path"] for h in rows(r)] == plain[2:7]
    # a text query has no file to exclude
    assert len(rows(cli("search", "x", "--exclude-self", "-k", "7", "--json"))) == 7
