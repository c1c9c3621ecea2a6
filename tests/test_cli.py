"""The command-line contract scripts rely on: output shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
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
    r = cli("search", "We went to the beach", "-k", "2")
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    rows = [line for line in lines if not re.match(r"^ +\d+: ", line)]
    assert len(rows) == 2 and rows[0].split()[0] == "1" and rows[1].split()[0] == "2"
    # the note's hit shows its lines under its row, numbered from the first of its range
    assert "# Trip" in r.stdout and "We went to the beach." in r.stdout
    assert len(lines) == 2 + 3


def test_info_failures_list(indexed, tiny_model):
    info = json_lines(cli("info", "--json").stdout)[0]
    assert info["files"] == 6 and info["failures"] == 1 and info["dim"] == 32
    assert info["model"] == f"local-dir:{tiny_model}"
    assert info["modalities"]["image"]["files"] == 5
    # which engine answers: this machine's faiss-cpu without a GPU, for a CLI search and a server
    assert {u: e["name"] for u, e in info["engine"].items()} == {
        "search": "faiss-cpu",
        "serve": "faiss-cpu",
    }
    assert "one-shot" in info["engine"]["search"]["reason"]
    shown = cli("info").stdout
    assert re.search(r"^serve engine: +faiss-cpu \(no GPU", shown, re.M)
    # one column for every row: the longest label still has a space after its colon
    assert re.search(r"^format_version: +1$", shown, re.M)
    columns = {len(re.match(r"[^:]*: +", line).group(0)) for line in shown.splitlines()}
    assert len(columns) == 1, shown
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


def one_line_error(r, code=2):
    """Every error: one line on stderr, exit status 2 (1 means "search found nothing")."""
    assert r.exit_code == code, (r.exit_code, r.output)
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
    assert "--type" in one_line_error(cli("search", "x", "--type", "hologram"))
    assert "-k" in one_line_error(cli("search", "x", "-k", "0"))


def test_error_bad_index_name(media, tiny_model):
    assert "invalid index name" in one_line_error(
        cli("index", media, "--model", tiny_model, "--index", "../x")
    )


def test_error_locked_index(indexed, tiny_model, home):
    from mmsearch.storage.collection import Collection

    with Collection.open_writer(home, "default"):
        msg = one_line_error(cli("index", indexed, "--model", tiny_model))
    assert "another mmsearch" in msg


def test_non_utf8_name_in_json(tiny_model, tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    raw = os.path.join(os.fsencode(d), b"b\xff.png")
    make_image(Path(os.fsdecode(raw)), pattern=1)
    make_image(d / "plain.png", pattern=2)
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
    from mmsearch.config import index_root
    from mmsearch.storage.collection import Collection

    def choice():
        with Collection.open_reader(index_root(), "default") as col:
            return col.manifest.vector_index.choice, col.manifest.index_type

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


# --- exit codes (issue 8, item 9) --------------------------------------------------------------
def test_search_exit_status_is_0_with_hits_and_1_without(indexed):
    assert cli("search", "beach").exit_code == 0
    r = cli("search", "beach", "--type", "audio")  # the index holds no audio
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.strip() == "no results"
    r = cli("search", "beach", "--type", "audio", "--json")
    assert r.exit_code == 1 and r.stdout == ""


def test_library_errors_exit_2_like_usage_errors(indexed):
    one_line_error(cli("search", "x", "--index", "ghost"))  # IndexNotFoundError
    one_line_error(cli("info", "--index", "ghost"))
    one_line_error(cli("search", "beach + "))  # UsageError from the query parser


def test_help_documents_exit_codes():
    for args in ([], ["search"]):
        out = cli(*args, "--help").stdout
        assert "Exit status" in out
        assert "1    search found nothing" in out and "2    error" in out


# --- option checks before any index or model (item 11) ---------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a torch model is loaded."""
    import mmsearch.encoders

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(mmsearch.encoders, "create_encoder", refuse)


@pytest.mark.parametrize(
    "args, words",
    [
        (["search", "x", "--device", "tpu"], ["--device", "'tpu' is not a device"]),
        (["search", "x", "--type", "hologram"], ["--type", "'hologram' is not one of"]),
        (["search", "x", "-k", "0"], ["-k"]),
        (["search", "x", "--no-such-option"], ["No such option: --no-such-option"]),
        (["index"], ["Missing argument"]),
        (["index", ".", "--device", "gpu0"], ["--device"]),
        (["align-audio", "--device", "tpu"], ["--device"]),
    ],
)
def test_option_errors_are_one_line_and_exit_2(indexed, no_model, args, words):
    msg = one_line_error(cli(*args))
    for word in words:
        assert word in msg
    assert "--help" in msg  # where to read about the option


def test_device_is_checked_at_the_edge(indexed, no_model):
    assert "--device" in one_line_error(cli("search", "beach", "--device", "tpu"))
    assert cli("search", "beach", "--device", "cuda:0", "-k", "1").exit_code == 0  # cuda:N is one


def test_query_file_is_checked_before_the_index_and_the_model(indexed, no_model, tmp_path):
    msg = one_line_error(cli("search", "--image", tmp_path))
    assert msg.endswith(f"query image {tmp_path} is a directory, not an image file")
    msg = one_line_error(cli("search", "--audio", tmp_path))
    assert msg.endswith("is a directory, not a sound file")
    # the file is checked before the index is looked for
    msg = one_line_error(cli("search", "--image", tmp_path / "none.jpg", "--index", "ghost"))
    assert "query file not found" in msg
    msg = one_line_error(cli("search", "a dog", "--audio", tmp_path / "none.wav"))
    assert "query file not found" in msg


def test_permission_error_is_one_line_naming_the_path(indexed, monkeypatch):
    from mmsearch.storage.collection import Collection

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/srv/idx/default/catalog.sqlite")

    monkeypatch.setattr(Collection, "open_reader", denied)
    msg = one_line_error(cli("info"))
    assert msg.startswith("mmsearch: error: permission denied: /srv/idx/default/catalog.sqlite (")
    assert "PermissionError" not in msg and "Errno" not in msg


# --- paths that are not UTF-8, or hold control characters (items 9, 24) --------------------
def test_non_utf8_name_gets_path_bytes_and_one_display(tiny_model, tmp_path):
    import base64

    d = tmp_path / "raw"
    raw = os.path.join(os.fsencode(d), b"b\xff.png")
    make_image(Path(os.fsdecode(raw)), pattern=1)
    make_image(d / "plain.png", pattern=2)
    broken = os.path.join(os.fsencode(d), b"x\xfe.jpg")
    Path(os.fsdecode(broken)).write_bytes(b"not an image")
    r = cli("index", d, "--model", tiny_model)
    assert r.exit_code == 0
    assert f"skipped {d}/x\\xfe.jpg: " in r.stderr

    hit, other = json_lines(cli("search", "--image", Path(os.fsdecode(raw)), "--json").stdout)
    assert os.fsencode(hit["path"]) == raw
    assert base64.b64decode(hit["path_bytes"]) == raw
    assert other["path"] == str(d / "plain.png") and "path_bytes" not in other  # only if needed
    (fail,) = json_lines(cli("failures", "--json").stdout)
    assert base64.b64decode(fail["path_bytes"]) == broken
    table = cli("search", "--image", Path(os.fsdecode(raw)), "-k", "1").stdout
    assert table.rstrip().endswith(f"{d}/b\\xff.png")
    assert cli("failures").stdout.startswith(f"{d}/x\\xfe.jpg: ")


def test_control_characters_in_names_are_escaped_in_tables(tiny_model, tmp_path):
    d = tmp_path / "odd"
    make_image(d / "two\nlines.png", pattern=1)
    make_image(d / "tab\there.png", pattern=2)
    (d / "bad\x1b[31m.jpg").write_bytes(b"not an image")
    r = cli("index", d, "--model", tiny_model)
    assert r.exit_code == 0
    assert f"skipped {d}/bad\\u001b[31m.jpg: " in r.stderr and "\x1b" not in r.stderr

    lines = cli("search", "--image", d / "two\nlines.png", "-k", "5").stdout.splitlines()
    assert len(lines) == 2  # one line per hit
    shown = {line.split("  ")[-1] for line in lines}
    assert shown == {f"{d}/two\\nlines.png", f"{d}/tab\\there.png"}
    assert cli("failures").stdout == f"{d}/bad\\u001b[31m.jpg: " + (
        json_lines(cli("failures", "--json").stdout)[0]["reason"] + "\n"
    )
    # --json keeps the exact names
    paths = {h["path"] for h in json_lines(cli("search", "x", "--json").stdout)}
    assert paths == {f"{d}/two\nlines.png", f"{d}/tab\there.png"}


# --- a reader that goes away (item 9) -----------------------------------------------------------
MMSEARCH = [sys.executable, "-m", "mmsearch.cli"]


def _env(home: Path) -> dict:
    """The environment of a subprocess that imports the mmsearch these tests import."""
    import mmsearch

    src = str(Path(mmsearch.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "MMSEARCH_HOME": str(home), "PYTHONPATH": path}


@pytest.mark.parametrize(
    "args", [["search", "beach", "--json"], ["search", "beach"], ["failures"], ["list"]]
)
def test_closed_pipe_ends_quietly_with_status_0(indexed, home, args):
    """`mmsearch search ... | head -1` where head is gone before mmsearch writes."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone: every write to the pipe fails with EPIPE
    try:
        out = subprocess.run(
            [*MMSEARCH, *args], stdout=write, stderr=subprocess.PIPE, env=_env(home), timeout=120
        )
    finally:
        os.close(write)
    stderr = out.stderr.decode()
    assert "BrokenPipe" not in stderr and "Exception ignored" not in stderr, stderr
    assert out.returncode == 0, stderr


# --- where indexes are found (item 8) -----------------------------------------------------------
@pytest.fixture
def no_home(tmp_path, monkeypatch) -> Path:
    """No $MMSEARCH_HOME, and a home folder of the test's own."""
    monkeypatch.delenv("MMSEARCH_HOME")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    return tmp_path / "user"


def test_search_from_a_subfolder_finds_the_indexes_folder_upward(
    tiny_model, media, tmp_path, no_home, monkeypatch
):
    project = tmp_path / "project"
    r = cli("index", media, "--model", tiny_model, "--index-dir", project / "indexes", "--json")
    assert r.exit_code == 0, r.output
    deep = project / "src" / "deep"
    (deep / "indexes").mkdir(parents=True)  # nearer, but holds no index: passed over
    monkeypatch.chdir(deep)
    r = cli("search", "The dog ran after a ball", "--json", "-k", "1")
    assert r.exit_code == 0, r.output
    assert json_lines(r.stdout)[0]["path"] == str(media / "notes" / "trip.md")
    r = cli("list")
    assert r.stderr.splitlines()[0] == f"indexes in {project / 'indexes'} (found upward)"
    assert r.stdout.startswith("default\t6 files\t")


def test_index_without_a_root_creates_the_per_user_one(
    tiny_model, media, tmp_path, no_home, monkeypatch
):
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))
    somewhere = tmp_path / "somewhere"
    somewhere.mkdir()
    monkeypatch.chdir(somewhere)
    assert cli("index", media, "--model", tiny_model).exit_code == 0
    root = xdg / "mmsearch" / "indexes"
    assert (root / "default" / "manifest.json").is_file()
    assert list(somewhere.iterdir()) == []  # no ./indexes in whatever folder it ran from
    monkeypatch.chdir(tmp_path)
    assert cli("search", "beach", "-k", "1").exit_code == 0
    r = cli("list", "--json")
    assert r.stderr.splitlines()[0] == f"indexes in {root} (per-user default)"
    (row,) = json_lines(r.stdout)
    assert (row["name"], row["root"], row["root_source"]) == (
        "default",
        str(root),
        "per-user default",
    )


def test_index_root_order(tmp_path, no_home, monkeypatch):
    from mmsearch.config import find_index_root

    monkeypatch.chdir(tmp_path)
    assert find_index_root().path == no_home / ".local" / "share" / "mmsearch" / "indexes"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/xdg")  # ignored, as the XDG spec says
    assert find_index_root().source == "per-user default"
    assert find_index_root().path == no_home / ".local" / "share" / "mmsearch" / "indexes"
    monkeypatch.setattr(sys, "platform", "darwin")
    expected = no_home / "Library" / "Application Support" / "mmsearch" / "indexes"
    assert find_index_root().path == expected
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert find_index_root().path == tmp_path / "local" / "mmsearch" / "indexes"
    monkeypatch.setenv("MMSEARCH_HOME", str(tmp_path / "env"))
    assert find_index_root() == find_index_root(None)
    assert find_index_root().source == "from $MMSEARCH_HOME"
    assert find_index_root(tmp_path / "x").path == tmp_path / "x"
    assert find_index_root(tmp_path / "x").source == "from --index-dir"


# --- read-only indexes (item 7) ---------------------------------------------------------------
def _read_only_mounts(tmp_path: Path) -> bool:
    """Whether this process may mount a folder read-only in a private mount namespace (root,
    as in CI); then even root cannot write there, as on a read-only medium."""
    probe = tmp_path / "probe"
    probe.mkdir()
    script = 'mount --bind -o ro "$1" "$1" && ! touch "$1/x" 2>/dev/null'
    try:
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", str(probe)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def run_read_only(folder: Path, home: Path, *args) -> subprocess.CompletedProcess:
    """mmsearch with `folder` mounted read-only."""
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *MMSEARCH, *map(str, args)],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_read_only_index_answers_and_nothing_is_written(indexed, home, tmp_path):
    if not _read_only_mounts(tmp_path):
        pytest.skip("needs unshare -m and mount --bind (root in a mount namespace)")
    # A writer that closed leaves no -wal and no -shm: SQLite would have to create the -shm
    assert not list((home / "default").glob("catalog.sqlite-*"))
    before = _snapshot(home)
    r = run_read_only(home, home, "search", "The dog ran after a ball", "--json", "-k", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(indexed / "notes" / "trip.md")
    r = run_read_only(home, home, "info", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == 6
    r = run_read_only(home, home, "list")
    assert r.returncode == 0 and r.stdout.startswith("default\t6 files"), r.stderr
    r = run_read_only(home, home, "failures")
    assert r.returncode == 0 and "broken.jpg" in r.stdout, r.stderr
    # a writer gets one line naming what it could not write
    r = run_read_only(home, home, "index", indexed)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mmsearch: error: ") and f"{home}/default" in r.stderr
    assert "read-only" in r.stderr and "Error" not in r.stderr
    assert _snapshot(home) == before


def test_readers_see_commits_in_the_wal_or_say_why_they_cannot(indexed, home, tmp_path):
    import shutil

    from mmsearch.records import FileEntry
    from mmsearch.storage.catalog import Catalog

    writer = Catalog(home / "default" / "catalog.sqlite")  # a writer still running
    try:
        writer.db.execute("PRAGMA wal_autocheckpoint=0")  # its commit stays in the WAL
        with writer.transaction():
            writer.record_failure(FileEntry(b"/late.jpg", "image", 1, 1), "late")
        # a reader where it may write sees the latest commit, WAL included
        assert "/late.jpg" in [f["path"] for f in json_lines(cli("failures", "--json").stdout)]
        copy = tmp_path / "copy"  # the index with its WAL but without the -shm
        shutil.copytree(home, copy, ignore=shutil.ignore_patterns("*-shm"))
    finally:
        writer.close()
    assert (copy / "default" / "catalog.sqlite-wal").stat().st_size > 0
    if not _read_only_mounts(tmp_path):
        pytest.skip("needs unshare -m and mount --bind (root in a mount namespace)")
    r = run_read_only(copy, copy, "failures")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "catalog.sqlite-wal" in r.stderr and "write access" in r.stderr
