"""Never lose an index: failed and interrupted runs, damaged files, planted links, a full disk.

Each test breaks something the way a user's machine does and checks what the user relies on:
the index still answers with what it had, nothing is mixed, and the way out is one command."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image, make_tone

from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, SearchOptions, index_root
from mmsearch.errors import (
    IndexFormatError,
    IndexNotFoundError,
    IndexWriteError,
    ModelError,
    ModelMismatchError,
)
from mmsearch.pipeline.run import index_paths
from mmsearch.search import Searcher
from mmsearch.storage.collection import Collection
from mmsearch.storage.layout import CATALOG, MANIFEST, VECTORS


def options(model, *roots, **kw) -> IndexOptions:
    enc = kw.pop("encoder", {})
    return IndexOptions(
        roots=tuple(Path(r) for r in roots),
        root_dir=index_root(),
        encoder=EncoderOptions(
            model=ModelSpec.parse(str(model)) if model else None, precision="fp32", **enc
        ),
        workers=kw.pop("workers", 0),
        **kw,
    )


def photos(root: Path, n: int, start: int = 0) -> Path:
    for i in range(start, start + n):
        make_image(root / f"p{i:02d}.png", pattern=i)
    return root


def state(name: str = "default") -> tuple[str, set[str], int]:
    """(model key, indexed paths, hits for a search of everything): what a user sees."""
    with Searcher(SearchOptions(name=name, root_dir=index_root(), k=1000)) as s:
        hits = s.search("anything")
        key = s.identity.key
        paths = {os.fsdecode(p) for p in s.col.catalog.files_under([b"/"])}
        units = s.col.catalog.unit_count()
    assert len(hits) == units  # every vector once, each with its catalog row
    return key, paths, len(hits)


def stop_after(n: int, exc=RuntimeError):
    """A progress callback that fails the run once `n` files are embedded (a crash, a kill
    or Ctrl-C at that moment)."""

    def progress(stage, done, total):
        if stage == "embed" and done >= n:
            raise exc("stopped here")

    return progress


def data_dir() -> Path:
    with Collection.open_reader(index_root(), "default") as col:
        return col.data_dir


# --- item 2: a failed rebuild keeps the old index ------------------------------------------------
def test_failed_rebuild_keeps_the_old_index_and_the_next_one_resumes(
    tiny_model, other_model, tmp_path
):
    lib = photos(tmp_path / "lib", 12)
    index_paths(options(tiny_model, lib))
    before = state()
    with pytest.raises(RuntimeError):
        index_paths(
            options(other_model, lib, rebuild=True, commit_every=4, commit_seconds=None),
            progress=stop_after(6),
        )
    assert state() == before  # the old model's index answers, whole
    from typer.testing import CliRunner

    from mmsearch.cli import app

    shown = CliRunner().invoke(app, ["info", "--json"])
    assert json.loads(shown.stdout)["unfinished_rebuild"].startswith("gen-")
    report = index_paths(options(other_model, lib, rebuild=True))
    assert "resumed an unfinished rebuild" in report.notes
    after = state()
    assert after[0] != before[0] and after[1:] == before[1:]
    # the old generation's files are gone; one generation is left
    index_dir = index_root() / "default"
    assert not (index_dir / CATALOG).exists()
    assert len(list(index_dir.glob("gen-*/" + CATALOG))) == 1


def test_plain_run_after_an_interrupted_rebuild_works_on_the_old_index(
    tiny_model, other_model, tmp_path
):
    lib = photos(tmp_path / "lib", 8)
    index_paths(options(tiny_model, lib))
    with pytest.raises(RuntimeError):
        index_paths(
            options(other_model, lib, rebuild=True, commit_every=2, commit_seconds=None),
            progress=stop_after(4),
        )
    photos(lib, 2, start=8)
    report = index_paths(options(None, lib))
    assert report.added == 2 and "discarded an unfinished rebuild" in report.notes
    assert not list((index_root() / "default").glob("gen-*"))
    with Collection.open_reader(index_root(), "default") as col:
        assert col.manifest.pending is None


def test_rebuild_with_the_same_model_copies_intact_vectors(tiny_model, tmp_path):
    lib = photos(tmp_path / "lib", 6)
    index_paths(options(tiny_model, lib))
    before = state()
    report = index_paths(options(tiny_model, lib, rebuild=True))
    assert (report.added, report.unchanged) == (0, 6)  # carried over, not read again
    assert state() == before


# --- item 3: an index remembers its model from the first moment ----------------------------------
def test_model_is_remembered_even_when_it_never_loaded(tiny_model, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "open_clip_model.safetensors").write_bytes(b"not weights")
    lib = photos(tmp_path / "lib", 2)
    with pytest.raises(ModelError):
        index_paths(options(broken, lib))
    # the next plain run uses the model it was started with, not the default (a download)
    with pytest.raises(ModelError, match="broken-model"):
        index_paths(options(None, lib))


def test_first_run_killed_before_the_schema_committed_is_an_empty_index(tiny_model, tmp_path):
    # SQLite makes the catalog file before its tables: a first run killed in between leaves a
    # file without tables. That is an index where nothing was ever stored, not a damaged one.
    (index_root() / "default").mkdir(parents=True)
    sqlite3.connect(index_root() / "default" / CATALOG).close()
    with pytest.raises(IndexNotFoundError, match="is empty: index some files first"):
        Searcher(SearchOptions(root_dir=index_root()))
    index_paths(options(tiny_model, photos(tmp_path / "lib", 2)))  # the next run just works
    assert len(state()[1]) == 2


# --- item 4: commits bounded in time; Ctrl-C commits what is embedded ----------------------------
def test_commits_are_bounded_in_time(tiny_model, tmp_path):
    lib = photos(tmp_path / "lib", 10)
    with pytest.raises(RuntimeError):
        # 256 files a commit by count, but a commit after every ~1 ms of work
        index_paths(
            options(tiny_model, lib, batch_size=2, commit_seconds=1e-3), progress=stop_after(5)
        )
    assert len(state()[1]) >= 4


def test_interrupt_commits_what_was_embedded(tiny_model, tmp_path):
    lib = photos(tmp_path / "lib", 10)
    with pytest.raises(KeyboardInterrupt):
        index_paths(
            options(tiny_model, lib, batch_size=2, commit_seconds=None),
            progress=stop_after(4, KeyboardInterrupt),
        )
    assert len(state()[1]) == 4  # the two batches embedded before Ctrl-C
    report = index_paths(options(None, lib))
    assert (report.added, report.unchanged, report.files) == (6, 4, 10)


# --- item 5: a missing model fails its files, not the run; --types -------------------------------
def test_missing_audio_model_fails_only_the_recordings(tiny_model, tmp_path):
    lib = photos(tmp_path / "lib", 3)
    make_tone(lib / "tone.wav", 440, 1.0, seed=0)
    missing = tmp_path / "no-such-clap"
    report = index_paths(options(tiny_model, lib, encoder={"audio_model": str(missing)}))
    assert (report.added, report.failed) == (3, 1)
    path, reason = report.failures[0]
    assert path.endswith("tone.wav") and reason.count("--audio-model") == 1, reason
    # retried on the next run although the file did not change
    again = index_paths(options(None, lib, encoder={"audio_model": str(missing)}))
    assert again.failed_now == 1 and again.unchanged == 3


def test_offline_audio_model_is_named_once_with_what_to_do(tiny_model, tmp_path, monkeypatch):
    """A hub id that is not in the cache while offline: the loader's own advice, not twice."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    lib = photos(tmp_path / "lib", 1)
    make_tone(lib / "tone.wav", 440, 1.0, seed=0)
    clap = "laion/clap-htsat-unfused"
    report = index_paths(options(tiny_model, lib, encoder={"audio_model": clap}))
    ((path, reason),) = report.failures
    assert path.endswith("tone.wav") and reason.count("--audio-model") == 1, reason
    assert "HF_HUB_OFFLINE" in reason and reason.endswith("run mmsearch index again")


def test_types_choose_what_a_run_indexes_and_leave_the_rest(tiny_model, tmp_path):
    lib = photos(tmp_path / "lib", 2)
    (lib / "note.md").write_text("a note about a beach\n")
    report = index_paths(options(tiny_model, lib, types=("text",)))
    assert (report.added, report.files) == (1, 1)
    report = index_paths(options(None, lib, types=("image",)))
    assert (report.added, report.removed, report.files) == (2, 0, 3)  # the note stays


def test_unknown_type_is_refused(tiny_model, tmp_path):
    from mmsearch.errors import UsageError

    with pytest.raises(UsageError, match="unknown type 'hologram'"):
        index_paths(options(tiny_model, photos(tmp_path / "lib", 1), types=("hologram",)))


# --- items 13, 16, 17: damage is repaired or named ----------------------------------------------
@pytest.fixture
def built(tiny_model, tmp_path):
    lib = photos(tmp_path / "lib", 5)
    index_paths(options(tiny_model, lib))
    return lib, state()


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_lost_manifest_is_rebuilt_from_the_catalog(built, other_model, damage):
    lib, before = built
    manifest = index_root() / "default" / MANIFEST
    if damage == "delete":
        manifest.unlink()
    elif damage == "truncate":
        manifest.write_text(manifest.read_text()[:20])
    else:
        manifest.write_bytes(os.urandom(200))
    assert state() == before  # readers answer as before
    # a writer restores it; another model is still refused, never mixed in
    with pytest.raises(ModelMismatchError):
        index_paths(options(other_model, lib))
    assert (index_root() / "default" / MANIFEST).is_file()
    assert state() == before


def test_lost_manifest_after_a_rebuild_finds_the_live_generation(built, tiny_model, other_model):
    lib, _ = built
    index_paths(options(other_model, lib, rebuild=True))
    before = state()
    (index_root() / "default" / MANIFEST).unlink()
    assert state() == before
    with pytest.raises(ModelMismatchError):
        index_paths(options(tiny_model, lib))
    assert state() == before


@pytest.mark.parametrize("damage", ["delete", "truncate", "zero", "garbage"])
def test_damaged_catalog_is_named_and_rebuild_is_the_way_out(built, tiny_model, damage):
    lib, before = built
    catalog = data_dir() / CATALOG
    if damage == "delete":
        catalog.unlink()
    elif damage == "truncate":
        with open(catalog, "r+b") as f:
            f.truncate(1000)
    elif damage == "zero":
        catalog.write_bytes(b"\0" * catalog.stat().st_size)
    else:
        catalog.write_bytes(os.urandom(4096))
    with pytest.raises((IndexFormatError,)) as e:
        state()
    assert "catalog.sqlite" in str(e.value) and "--rebuild" in str(e.value)
    with pytest.raises(IndexFormatError):
        index_paths(options(None, lib))
    report = index_paths(options(tiny_model, lib, rebuild=True))
    assert state()[1:] == before[1:]
    if damage != "delete":
        assert any("kept it aside" in n for n in report.notes)
        assert list((index_root() / "default").glob(CATALOG + ".damaged-*"))


@pytest.mark.parametrize("damage", ["delete", "truncate", "zero"])
def test_damaged_vector_file_is_rebuilt_from_the_catalog(built, damage):
    lib, before = built
    vectors = data_dir() / VECTORS
    if damage == "delete":
        vectors.unlink()
    elif damage == "truncate":
        with open(vectors, "r+b") as f:
            f.truncate(vectors.stat().st_size // 2)
    else:
        vectors.write_bytes(b"\0" * vectors.stat().st_size)
    assert state() == before
    index_paths(options(None, lib))
    assert state() == before


# --- item 19: readers check what they read --------------------------------------------------------
def test_older_vector_file_put_back_is_not_served(built, tmp_path):
    lib, _ = built
    old = tmp_path / "old.faiss"
    shutil.copy(data_dir() / VECTORS, old)
    photos(lib, 3, start=5)
    index_paths(options(None, lib))
    shutil.copy(old, data_dir() / VECTORS)
    key, paths, hits = state()
    assert len(paths) == 8 and hits == 8


def test_catalog_that_lost_commits_says_so_and_the_next_run_restores(built, tmp_path):
    lib, _ = built
    old = tmp_path / "old.sqlite"
    shutil.copy(data_dir() / CATALOG, old)  # as if the WAL with later commits was lost
    photos(lib, 3, start=5)
    index_paths(options(None, lib))
    shutil.copy(old, data_dir() / CATALOG)
    with Collection.open_reader(index_root(), "default") as col:
        assert any("missing commits" in n and "5 of 8 files" in n for n in col.notes)
    key, paths, hits = state()
    assert len(paths) == 5 and hits == 5  # what the catalog holds, no stale vectors
    report = index_paths(options(None, lib))
    assert report.added == 3 and state()[1:] == (paths | {str(lib / f"p{i:02d}.png")
                                                          for i in range(5, 8)}, 8)  # fmt: skip


# --- item 18: an interrupted align-audio leaves the old audio ----------------------------------
# (covered with a real CLAP tower in test_audio_cli.py::test_interrupted_align_audio_keeps_old)


# --- item 20: links planted in the index directory are not followed ----------------------------
def test_planted_links_are_not_followed(built, tmp_path):
    lib, before = built
    index_dir = index_root() / "default"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("vectors.faiss.tmp", "manifest.json.tmp"):
        os.symlink(victim, index_dir / name)
    photos(lib, 1, start=5)
    index_paths(options(None, lib))
    assert victim.read_text() == "precious"
    (index_dir / "lock").unlink()
    os.symlink(victim, index_dir / "lock")
    with pytest.raises(IndexWriteError, match="symbolic link"):
        index_paths(options(None, lib))
    assert victim.read_text() == "precious"


# --- item 14: a full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_stops_with_one_line_and_keeps_the_last_commit(
    tiny_model, tmp_path, small_disk, monkeypatch
):
    monkeypatch.setenv("MMSEARCH_HOME", str(small_disk / "indexes"))
    lib = photos(tmp_path / "lib", 4)
    index_paths(options(tiny_model, lib))
    before = state()
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # leave nothing free
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    for i in range(4, 80):
        (lib / f"n{i}.md").write_text(f"note {i} " + "words " * 400)
    with pytest.raises(IndexWriteError, match="disk full") as e:
        index_paths(options(None, lib, commit_every=8))
    assert "\n" not in str(e.value)
    filler.unlink()
    assert state() == before or len(state()[1]) > len(before[1])  # last commit intact
    assert not list((small_disk / "indexes" / "default").glob("*.tmp"))
    index_paths(options(None, lib))
    assert len(state()[1]) == 80


# --- item 23: a note over --max-note-bytes is indexed up to the cap and the cut is recorded -------
def test_truncated_note_is_indexed_and_recorded(tiny_model, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "long.md").write_text("".join(f"line {i} about the sea\n" for i in range(2000)))
    report = index_paths(options(tiny_model, lib, max_note_bytes=1000))
    assert report.files == 1 and not report.failures and "truncated at" in report.partial[0][1]
    with Collection.open_reader(index_root(), "default") as col:
        assert ["truncated at" in reason for _, reason, _ in col.catalog.failures()] == [True]
    again = index_paths(options(None, lib, max_note_bytes=1000))
    assert (again.unchanged, again.failed_now) == (1, 0)  # not retried while unchanged


# --- items 13, 19: a lost or damaged WAL -----------------------------------------------------------
@pytest.mark.parametrize("damage", ["delete", "truncate", "zero"])
def test_lost_wal_is_reported_and_the_next_run_restores(built, damage, tmp_path):
    lib, _ = built
    photos(lib, 3, start=5)
    # A writer killed while another connection holds the catalog: its last commits stay in the
    # -wal file, never checkpointed into catalog.sqlite.
    script = (
        "import os, sqlite3, sys\n"
        "from pathlib import Path\n"
        "from mmsearch.config import IndexOptions, EncoderOptions, index_root\n"
        "from mmsearch.pipeline.run import index_paths\n"
        "db = sqlite3.connect(sys.argv[2]); db.execute('SELECT 1 FROM files').fetchall()\n"
        "index_paths(IndexOptions(roots=(Path(sys.argv[1]),), root_dir=index_root(), workers=0,\n"
        "    encoder=EncoderOptions(precision='fp32')))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    catalog = data_dir() / CATALOG
    subprocess.run([sys.executable, "-c", script, str(lib), str(catalog)], check=False)
    wal = catalog.with_name(CATALOG + "-wal")
    assert wal.stat().st_size > 0
    if damage == "delete":
        wal.unlink()
    elif damage == "truncate":
        with open(wal, "r+b") as f:
            f.truncate(100)
    else:
        wal.write_bytes(b"\0" * wal.stat().st_size)
    catalog.with_name(CATALOG + "-shm").unlink(missing_ok=True)
    with Collection.open_reader(index_root(), "default") as col:
        assert any("missing commits" in n and "5 of 8 files" in n for n in col.notes)
    assert state()[2] == 5  # what the catalog holds, never the lost files' stale vectors
    report = index_paths(options(None, lib))
    assert report.added == 3 and len(state()[1]) == 8


# --- item 4: Ctrl-C on the command line ------------------------------------------------------------
def test_ctrl_c_commits_and_exits_130_without_tracebacks(tiny_model, tmp_path):
    import signal
    import time

    lib = tmp_path / "lib"
    for i in range(600):
        make_image(lib / f"d{i // 100}" / f"p{i:03d}.png", pattern=i, size=(40, 32))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsearch.cli", "index", str(lib), "--model", str(tiny_model),
         "--workers", "1", "--batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    catalog = index_root() / "default" / CATALOG
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if catalog.is_file():
            with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
                try:
                    if db.execute("SELECT COUNT(*) FROM files").fetchone()[0] > 0:
                        break
                except sqlite3.OperationalError:
                    pass
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0 and len(state()[1]) == 600:
        # on a loaded machine the signal can land after the last commit, as the process exits
        pytest.skip("the run completed before the interrupt reached it")
    assert proc.returncode == 130, (out, err)
    assert "interrupted; everything committed so far is kept" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    kept = len(state()[1])
    assert 0 < kept < 600
    report = index_paths(options(None, lib))
    assert (report.unchanged, report.added) == (kept, 600 - kept)
