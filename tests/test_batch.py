"""Batch queries: `mmsearch search --queries FILE` (or '-' for stdin) answers every line as the
same search given alone would, in one process; JSON rows carry their query, the table a header
per query; a bad line is refused, naming it, before any index is opened."""

from __future__ import annotations

import json

import pytest
from conftest import make_note, make_photo
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.errors import UsageError
from mmsearch.search.batch import parse_line, read_queries

runner = CliRunner()


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def rows(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def indexed(tmp_path, tiny_model):
    root = tmp_path / "files"
    for i in range(4):
        make_photo(root / f"p{i}.jpg", seed=i)
    make_note(root / "beach.md", "A dog on a beach.\nIt runs after a ball.\n")
    assert cli("index", root, "--model", tiny_model).exit_code == 0
    return root


def test_each_line_is_answered_as_the_same_search_alone(indexed, tmp_path):
    lines = ["a dog on a beach", "", "sunset + 2:sea - people", f"cat --image {indexed / 'p1.jpg'}"]
    (tmp_path / "q.txt").write_text("\n".join(lines) + "\n")
    r = cli("search", "--queries", tmp_path / "q.txt", "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    got = rows(r)
    assert [row["query"] for row in got] == [lines[0]] * 3 + [lines[2]] * 3 + [lines[3]] * 3
    assert [row["line"] for row in got[::3]] == [1, 3, 4]
    for text in ("a dog on a beach", "sunset + 2:sea - people"):
        alone = rows(cli("search", text, "-k", "3", "--json"))
        batch = [row for row in got if row["query"] == text]
        # the same hits in the same order; scores to rounding (the texts embed in one batch)
        assert [(b["path"], b["rank"]) for b in batch] == [(a["path"], a["rank"]) for a in alone]
        assert [b["score"] for b in batch] == pytest.approx([a["score"] for a in alone], abs=1e-4)
    alone = rows(cli("search", "cat", "--image", indexed / "p1.jpg", "-k", "3", "--json"))
    assert [row["path"] for row in got[6:]] == [row["path"] for row in alone]


def test_stdin_and_the_table_with_a_header_per_query(indexed):
    r = cli("search", "--queries", "-", "-k", "2", "--type", "image", input="dog\nsea\n")
    assert r.exit_code == 0, r.output
    blocks = r.stdout.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["# dog", "# sea"]
    assert all(len(b.splitlines()) == 3 for b in blocks)  # header + 2 hits


def test_exit_status_is_1_only_when_no_query_found_anything(indexed):
    r = cli("search", "--queries", "-", "--type", "audio", input="dog\nsea\n")
    assert r.exit_code == 1 and r.stdout.count("no results") == 2
    r = cli("search", "--queries", "-", "--path", "*.md", "--json", input="dog\n")
    assert r.exit_code == 0 and {row["modality"] for row in rows(r)} == {"text"}


def test_bad_lines_are_refused_before_the_index_opens(tmp_path):
    def refused(text: str, message: str):
        r = cli("search", "--queries", "-", "--index", "nope", input=text)
        assert r.exit_code == 2 and message in r.output and "nope" not in r.output, r.output

    refused(f"dog\n\ncat --audio {tmp_path}\n", "line 3: query sound")
    refused("dog\nx --image missing.jpg\n", "line 2: query file not found: missing.jpg")
    refused("dog -k 3\n", "line 1: -k cannot be given per query")
    refused("dog --type image\n", "line 1: --type cannot be given per query")
    refused("\n \n", "no queries in stdin")
    r = cli("search", "dog", "--queries", "-", input="cat\n")
    assert r.exit_code == 2 and "give no QUERY" in r.output
    r = cli("search", "--queries", tmp_path / "absent.txt")
    assert r.exit_code == 2 and "queries file not found" in r.output


def test_line_syntax(tmp_path):
    image = make_photo(tmp_path / "my photo.jpg", seed=1)
    q = parse_line(f'red car --image "{image}"  ', 7)
    assert (q.line, q.query, q.image, q.audio) == (7, "red car", image, None)
    assert q.text == f'red car --image "{image}"  '
    assert parse_line("-people + t-shirt").query == "-people + t-shirt"
    assert parse_line(f"--image='{image}'").query is None
    assert parse_line("   ") is None
    with pytest.raises(UsageError, match="line 2: --image given twice"):
        parse_line(f"--image {image} --image {image}", 2)
    assert [q.line for q in read_queries(["a\n", "\n", "b\r\n"])] == [1, 3]
