"""Files that fight back: paths swapped for FIFOs or devices after the walk, decoders that never
finish, huge sparse files. A run must record each as a failure with its reason and go on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import make_image, make_note

import mmsearch
from mmsearch import loaders
from mmsearch.config import (
    AudioWindowing,
    EncoderOptions,
    ImagePrep,
    IndexOptions,
    ModelSpec,
    index_root,
)
from mmsearch.errors import LoadError
from mmsearch.loaders import LoadSettings, content_hash, file_hash, load_file
from mmsearch.loaders.audio import iter_windows
from mmsearch.pipeline import run as indexer
from mmsearch.pipeline.walk import absolute, walk
from mmsearch.records import AUDIO, IMAGE, TEXT, FileEntry

SETTINGS = LoadSettings(
    image_prep=ImagePrep(size=(32, 32)), modalities=frozenset({IMAGE, TEXT, AUDIO})
)
GUARD_S = 10.0  # a load that blocks this long has hung; the guard releases it and the test fails


@contextmanager
def released_after(fifo: Path, seconds: float = GUARD_S):
    """Fail instead of hanging: should the block still run after `seconds`, open `fifo` for
    writing (which releases a reader blocked in open()) and fail the test."""
    fired = threading.Event()

    def release():
        fired.set()
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    timer = threading.Timer(seconds, release)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    assert not fired.is_set(), f"blocked on the FIFO {fifo} for {seconds} s"


def _wav(path: Path) -> Path:
    sf.write(path, np.sin(np.arange(8000) / 5).astype(np.float32), 8000)
    return path


@pytest.mark.parametrize("name", ["photo.jpg", "note.txt", "sound.wav"])
def test_path_replaced_by_a_fifo_after_the_walk_fails_fast(tmp_path, name):
    make_image(tmp_path / "photo.jpg", pattern=1)
    make_note(tmp_path / "note.txt", "a note\n")
    _wav(tmp_path / "sound.wav")
    entries = {os.path.basename(e.path).decode(): e for e in walk([absolute(tmp_path)])}
    assert set(entries) == {"photo.jpg", "note.txt", "sound.wav"}
    victim = tmp_path / name
    victim.unlink()
    os.mkfifo(victim)
    with released_after(victim):
        out = load_file(entries[name], SETTINGS)
    assert out.error == "not a regular file (fifo)" and out.hash is None
    for other in set(entries) - {name}:  # the others load, hashed as the index always hashed them
        ok = load_file(entries[other], SETTINGS)
        assert ok.error is None
        assert ok.hash == content_hash((tmp_path / other).read_bytes())


def test_fifo_is_refused_by_hashing_and_audio_decoding(tmp_path):
    fifo = tmp_path / "x.wav"
    os.mkfifo(fifo)
    with released_after(fifo):
        with pytest.raises(OSError, match=r"not a regular file \(fifo\)"):
            file_hash(os.fsencode(fifo))
        with pytest.raises(LoadError) as e:
            list(iter_windows(fifo, AudioWindowing(sample_rate=8000)))
    assert e.value.reason == "not a regular file (fifo)"


def test_devices_and_sockets_are_refused(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="mm"))  # AF_UNIX paths must be short
    try:
        sock_path = short / "s.txt"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(sock_path))
            entry = FileEntry(os.fsencode(sock_path), TEXT, 0, 0)
            assert load_file(entry, SETTINGS).error == "not a regular file (socket)"
    finally:
        for p in short.iterdir():
            p.unlink()
        short.rmdir()
    dev = FileEntry(b"/dev/zero", TEXT, 0, 0)  # reading it would never end
    assert load_file(dev, SETTINGS).error == "not a regular file (character device)"


def test_index_run_records_a_planted_fifo_and_binary_note_and_goes_on(
    tiny_model, tmp_path, monkeypatch
):
    root = tmp_path / "media"
    make_image(root / "a.jpg", pattern=1)
    make_note(root / "ok.md", "the dog ran after the ball\n")
    make_note(root / "swapped.txt", "soon a fifo\n")
    (root / "junk.txt").write_bytes(np.random.default_rng(0).bytes(4000))
    real_walk = indexer.walk

    def walk_then_swap(*a, **kw):  # the file becomes a FIFO between the walk and its load
        entries = list(real_walk(*a, **kw))
        (root / "swapped.txt").unlink()
        os.mkfifo(root / "swapped.txt")
        return iter(entries)

    monkeypatch.setattr(indexer, "walk", walk_then_swap)
    opts = IndexOptions(
        roots=(root,),
        root_dir=index_root(),
        encoder=EncoderOptions(model=ModelSpec.parse(str(tiny_model)), precision="fp32"),
        workers=0,
    )
    with released_after(root / "swapped.txt", 60):
        report = indexer.index_paths(opts)
    reasons = {os.path.basename(p): r for p, r in report.failures}
    assert reasons == {
        "swapped.txt": "not a regular file (fifo)",
        "junk.txt": "binary content, not a text note",
    }
    assert report.added == 2 and report.failed == 2


def _slow_decoder(seconds: float):
    def decode(f, settings):
        time.sleep(seconds)  # stands for a decoder stuck on a pathological file
        return "0" * 32, np.zeros((32, 32, 3), np.uint8), None, None

    return decode


def test_decoding_past_its_budget_fails_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(loaders.DECODERS, IMAGE, _slow_decoder(30))
    entry = next(walk([absolute(make_image(tmp_path / "slow.jpg"))]))
    handler = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    out = load_file(entry, LoadSettings(image_prep=ImagePrep(size=(32, 32)), decode_budget_s=0.2))
    assert time.monotonic() - started < GUARD_S
    assert out.error == "decoding took longer than 0.2 s" and out.payload is None
    # nothing left armed: the next file, and the rest of the process, are not interrupted
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is handler


def test_budget_keeps_an_outer_alarm(tmp_path, monkeypatch):
    monkeypatch.setitem(loaders.DECODERS, IMAGE, _slow_decoder(30))
    entry = next(walk([absolute(make_image(tmp_path / "slow.jpg"))]))

    def outer(signum, frame):
        raise AssertionError("the outer alarm fired")

    previous = signal.signal(signal.SIGALRM, outer)
    signal.setitimer(signal.ITIMER_REAL, 120)
    try:
        out = load_file(
            entry, LoadSettings(image_prep=ImagePrep(size=(32, 32)), decode_budget_s=0.2)
        )
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert signal.getsignal(signal.SIGALRM) is outer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert out.error == "decoding took longer than 0.2 s"
    assert 100 < left <= 120


def test_loading_in_a_thread_works_without_a_budget(tmp_path):
    # Ray actors and thread pools cannot take signals: the file loads, untimed
    entry = next(walk([absolute(make_image(tmp_path / "a.png", pattern=3))]))
    settings = LoadSettings(image_prep=ImagePrep(size=(32, 32)), decode_budget_s=5)
    result = []
    t = threading.Thread(target=lambda: result.append(load_file(entry, settings)))
    t.start()
    t.join(GUARD_S)
    assert result and result[0].error is None and result[0].payload.shape == (32, 32, 3)


def test_audio_block_past_its_budget_fails_the_file(tmp_path, monkeypatch):
    p = _wav(tmp_path / "slow.wav")

    def stuck_read(self, *a, **kw):
        time.sleep(30)

    monkeypatch.setattr(sf.SoundFile, "read", stuck_read)
    started = time.monotonic()
    with pytest.raises(LoadError) as e:
        list(iter_windows(p, AudioWindowing(sample_rate=8000), time_budget_s=0.2))
    assert time.monotonic() - started < GUARD_S
    assert e.value.reason == "decoding took longer than 0.2 s"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


_RSS_PROBE = """
import json, os, resource, sys
from mmsearch.config import ImagePrep
from mmsearch.records import FileEntry
from mmsearch.loaders import LoadSettings, load_file
settings = LoadSettings(image_prep=ImagePrep(size=(32, 32)))
warm, huge = json.loads(sys.argv[1])
for path, modality in warm:  # imports, PIL plugins: what every file costs once
    assert load_file(FileEntry(os.fsencode(path), modality, 0, 0), settings).error is None
out = {}
for path, modality in huge:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = load_file(FileEntry(os.fsencode(path), modality, 0, 0), settings).error
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    out[os.path.basename(path)] = [error, grew * 1024]
print(json.dumps(out))
"""


def test_huge_sparse_files_are_refused_in_bounded_memory(tmp_path):
    files = []
    for name, modality in (("huge.jpg", IMAGE), ("huge.txt", TEXT)):
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(2 << 30)  # 2 GiB of holes: no disk used, all zeros when read
        if os.stat(p).st_blocks * 512 > 1 << 20:
            pytest.skip("this filesystem has no sparse files")
        files.append((str(p), modality))
    warm = [
        (str(make_image(tmp_path / "small.jpg", pattern=2)), IMAGE),
        (str(make_note(tmp_path / "small.txt", "a small note\n")), TEXT),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(mmsearch.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, json.dumps([warm, files])],
        capture_output=True, text=True, timeout=300, env=env, check=True,
    )  # fmt: skip
    out = json.loads(done.stdout)
    assert out["huge.jpg"][0] == "not a recognised image format"
    assert out["huge.txt"][0] == "binary content, not a text note"
    for error, grew in out.values():
        assert grew < 64 << 20, f"peak RSS grew by {grew >> 20} MiB for one file ({error})"
