"""The command-line contract scripts rely on: output shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image
from typer.testing import CliRunner

from mmsearch.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def indexed(tiny_model, media):
    r = cli("index", media, "--model", tiny_model, "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    return media


def test_index_json_summary(tiny_model, media):
    r = cli("index", media, "--model", tiny_model, "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    (summary,) = json_lines(r.stdout)
    for key in ("added", "updated", "removed", "moved", "unchanged", "failed", "files"):
        assert isinstance(summary[key], int)
    assert (summary["added"], summary["failed"], summary["files"]) == (6, 1, 6)


def test_index_human_summary_names_skipped_files(tiny_model, media):
    r = cli("index", media, "--model", tiny_model, "--workers", "0")
    assert r.exit_code == 0
    assert "6 added" in r.stdout and "1 failed" in r.stdout
    assert "broken.jpg" in r.stderr


def test_search_json_hits(indexed):
    r = cli("search", "We went to the beach", "--json", "-k", "3")
    assert r.exit_code == 0, r.output
    hits = json_lines(r.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["path"] == str(indexed / "notes" / "trip.md")
    assert hits[0]["modality"] == "text" and os.path.isabs(hits[0]["path"])
    assert hits[0]["start"] == 1 and hits[0]["end"] == 3
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:], strict=False))


def test_search_by_image_with_type_filter(indexed):
    r = cli("search", "--image", indexed / "photos" / "p2.jpg", "--type", "image", "--json")
    hits = json_lines(r.stdout)
    assert r.exit_code == 0 and len(hits) == 5
    assert Path(hits[0]["path"]).name == "p2.jpg"
    assert {h["modality"] for h in hits} == {"image"}


def test_search_table_output(indexed):
    r = cli("search", "beach", "-k", "2")
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1"


def test_info_failures_list(indexed, tiny_model):
    info = json_lines(cli("info", "--json").stdout)[0]
    assert info["files"] == 6 and info["failures"] == 1 and info["dim"] == 32
    assert info["model"] == f"local-dir:{tiny_model}"
    assert info["modalities"]["image"]["files"] == 5
    fails = json_lines(cli("failures", "--json").stdout)
    assert [Path(f["path"]).name for f in fails] == ["broken.jpg"] and fails[0]["reason"]
    names = [x["name"] for x in json_lines(cli("list", "--json").stdout)]
    assert names == ["default"]


def test_index_dir_option_overrides_home(tiny_model, media, tmp_path):
    other = tmp_path / "elsewhere"
    r = cli(
        "index", media, "--model", tiny_model, "--index-dir", other, "--index", "pics", "--json"
    )
    assert r.exit_code == 0
    assert (other / "pics" / "manifest.json").is_file()


def one_line_error(r, code=None):
    assert r.exit_code != 0
    if code is not None:
        assert r.exit_code == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsearch: error:"), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def test_error_missing_root(tiny_model, tmp_path):
    msg = one_line_error(cli("index", tmp_path / "nope", "--model", tiny_model))
    assert "does not exist" in msg


def test_error_unknown_index():
    assert "no index named 'ghost'" in one_line_error(cli("search", "x", "--index", "ghost"))


def test_error_model_mismatch(indexed, other_model):
    msg = one_line_error(cli("index", indexed, "--model", other_model))
    assert "--rebuild" in msg and str(other_model) in msg


def test_error_bad_model_dir(media, tmp_path):
    assert "model directory not found" in one_line_error(
        cli("index", media, "--model", tmp_path / "nomodel")
    )


def test_error_unknown_tag(media):
    msg = one_line_error(cli("index", media, "--model", "ViT-B-32:no_such_tag"))
    assert "no_such_tag" in msg


def test_error_bad_query_image(indexed, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"zz")
    assert "query image" in one_line_error(cli("search", "--image", bad))
    assert "not found" in one_line_error(cli("search", "--image", tmp_path / "none.jpg"))


def test_error_empty_query_and_bad_type(indexed):
    assert "nothing to search" in one_line_error(cli("search"))
    assert "--type" in one_line_error(cli("search", "x", "--type", "video"))
    assert "-k" in one_line_error(cli("search", "x", "-k", "0"))


def test_error_bad_index_name(media, tiny_model):
    assert "invalid index name" in one_line_error(
        cli("index", media, "--model", tiny_model, "--index", "../x")
    )


def test_error_locked_index(indexed, tiny_model, home):
    from mmsearch.collection import Collection

    with Collection.open_writer(home, "default"):
        msg = one_line_error(cli("index", indexed, "--model", tiny_model))
    assert "another mmsearch" in msg


def test_non_utf8_name_in_json(tiny_model, tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    raw = os.path.join(os.fsencode(d), b"b\xff.png")
    make_image(Path(os.fsdecode(raw)), pattern=1)
    cli("index", d, "--model", tiny_model, "--json")
    r = cli("search", "--image", Path(os.fsdecode(raw)), "--json")
    assert r.exit_code == 0
    hit = json_lines(r.stdout)[0]
    assert os.fsencode(hit["path"]) == raw


def test_installed_command_end_to_end(tiny_model, media, tmp_path):
    """The real entry points in a new process, as a user runs them."""
    env = {**os.environ, "MMSEARCH_HOME": str(tmp_path / "e2e")}
    exe = Path(sys.executable).with_name("mmsearch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mmsearch.cli"]
    out = subprocess.run(
        [*cmd, "index", str(media), "--model", str(tiny_model), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"] == 6
    top = Path(__file__).resolve().parents[1] / "cli.py"
    out = subprocess.run(
        [sys.executable, str(top), "search", "The dog ran after a ball", "--json", "-k", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["path"] == str(media / "notes" / "trip.md")
    out = subprocess.run(
        [*cmd, "search", "x", "--index", "nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and out.stderr.count("\n") == 1


def test_index_type_option_is_remembered_and_checked(tiny_model, media):
    from mmsearch.collection import Collection
    from mmsearch.config import index_root

    def choice():
        with Collection.open_reader(index_root(), "default") as col:
            return col.manifest["vector_index"]["choice"], col.manifest["index_type"]

    r = cli("index", media, "--model", tiny_model, "--workers", "0", "--index-type", "flat")
    assert r.exit_code == 0, r.output
    assert choice() == ("flat", "IDMap2,FlatIP")
    make_image(media / "photos" / "later.png", pattern=5)
    assert cli("index", media, "--workers", "0").exit_code == 0
    assert choice()[0] == "flat"  # a later run without the option keeps the index's choice
    # ivf needs enough vectors to train its lists (a few hundred): a handful stays exact
    assert cli("index", media, "--workers", "0", "--index-type", "ivf").exit_code == 0
    assert choice() == ("ivf", "IDMap2,FlatIP")
    r = cli("index", media, "--index-type", "hnsw")
    assert r.exit_code == 2 and "--index-type" in r.output
