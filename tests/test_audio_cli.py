"""Audio through the whole product: index recordings, search them by text, image and sound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import make_image
from test_audio_tower import make_tiny_clap
from typer.testing import CliRunner

from mmsearch.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def hits_of(r) -> list[dict]:
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def clap_dir(tmp_path_factory) -> Path:
    return make_tiny_clap(tmp_path_factory.mktemp("clap") / "clap")


def tone(path: Path, freq: float, seconds: float, rate: int = 16000, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    data = np.stack([wave] * channels, -1) if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), rate)
    return path


def few_captions(mp) -> None:
    """The projector fit is the same code on fewer captions: keeps the suite fast on 2 cores."""
    from mmsearch.encoders.clap import projector as clap_projector

    subset = clap_projector.read_captions()[::12]
    mp.setattr(clap_projector, "read_captions", lambda: list(subset))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, clap_dir):
    """One library indexed once (fitting the projector takes a while); tests that change it work
    on a copy of the index root."""
    base = tmp_path_factory.mktemp("audio-lib")
    root = base / "lib"
    tone(root / "rec" / "low.wav", 220, 1.5)
    tone(root / "rec" / "high.flac", 3000, 1.0, rate=44100, channels=2)
    tone(root / "rec" / "long.ogg", 880, 7.0)
    (root / "rec" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    for i in range(3):
        make_image(root / "pics" / f"p{i}.png", pattern=i)
    index_root = base / "indexes"
    with pytest.MonkeyPatch.context() as mp:
        few_captions(mp)
        r = runner.invoke(
            app,
            ["index", str(root), "--model", str(tiny_model), "--audio-model", str(clap_dir),
             "--index-dir", str(index_root), "--json"],
        )  # fmt: skip
    summary = hits_of(r)[0]
    assert (summary["added"], summary["failed"], summary["files"]) == (6, 1, 6)
    return root, index_root


@pytest.fixture
def library(built, home, monkeypatch):
    """The built library, searched through $MMSEARCH_HOME pointing at a private copy."""
    root, index_root = built
    shutil.copytree(index_root, home)
    return root


def test_text_finds_audio_with_time_ranges(library):
    hits = hits_of(cli("search", "a dog barking", "--type", "audio", "--json", "-k", "50"))
    assert {h["modality"] for h in hits} == {"audio"}
    by_file = {}
    for h in hits:
        by_file.setdefault(Path(h["path"]).name, []).append((h["start"], h["end"]))
    assert set(by_file) == {"low.wav", "high.flac", "long.ogg"}
    assert len(by_file["long.ogg"]) >= 3  # 7 s in 2 s windows
    assert all(0 <= s < e <= 7.0 + 1e-6 for s, e in by_file["long.ogg"])


def test_sound_finds_itself_first(library):
    hits = hits_of(
        cli("search", "--audio", library / "rec" / "low.wav", "--type", "audio", "--json")
    )
    assert Path(hits[0]["path"]).name == "low.wav"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_audio_to_images_and_images_to_audio(library):
    imgs = hits_of(
        cli("search", "--audio", library / "rec" / "low.wav", "--type", "image", "--json")
    )
    assert len(imgs) == 3 and {h["modality"] for h in imgs} == {"image"}
    sounds = hits_of(
        cli("search", "--image", library / "pics" / "p1.png", "--type", "audio", "--json")
    )
    assert sounds and {h["modality"] for h in sounds} == {"audio"}


def test_corrupt_audio_is_recorded(library):
    fails = hits_of(cli("failures", "--json"))
    assert [Path(f["path"]).name for f in fails] == ["corrupt.wav"] and fails[0]["reason"]


def test_info_names_the_audio_model(library, clap_dir):
    info = hits_of(cli("info", "--json"))[0]
    assert str(clap_dir) in info["audio_model"]
    assert info["modalities"]["audio"]["files"] == 3


def test_reindex_without_audio_model_keeps_the_index_model(library):
    new = tone(library / "rec" / "new.wav", 440, 1.0)
    try:
        summary = hits_of(cli("index", library, "--json"))[0]
    finally:
        new.unlink()
    assert (summary["added"], summary["unchanged"]) == (1, 6)


def test_align_audio_refits_and_reembeds(library, monkeypatch):
    few_captions(monkeypatch)
    before = hits_of(cli("search", "a bird", "--type", "audio", "--json", "-k", "1"))
    summary = hits_of(cli("align-audio", "--json"))[0]
    assert summary["updated"] == 3
    after = hits_of(cli("search", "a bird", "--type", "audio", "--json", "-k", "1"))
    assert len(before) == len(after) == 1
    # every re-embedded window is in the vector index once: no stale and no doubled vectors
    every = hits_of(cli("search", "a bird", "--type", "audio", "--json", "-k", "1000"))
    windows = hits_of(cli("info", "--json"))[0]["modalities"]["audio"]["vectors"]
    assert len(every) == len({(h["path"], h["start"]) for h in every}) == windows


def test_interrupted_align_audio_keeps_the_old_audio_and_resumes(library, monkeypatch):
    from mmsearch.config import IndexOptions, index_root
    from mmsearch.pipeline.run import align_audio

    few_captions(monkeypatch)
    before = hits_of(cli("search", "a bird", "--type", "audio", "--json", "-k", "100"))
    info = hits_of(cli("info", "--json"))[0]

    def kill(stage, done, total):
        if stage == "embed" and done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        align_audio(IndexOptions(roots=(), root_dir=index_root(), workers=0), progress=kill)
    # the index answers exactly as before: the old projector over the old windows
    assert hits_of(cli("search", "a bird", "--type", "audio", "--json", "-k", "100")) == before
    now = hits_of(cli("info", "--json"))[0]
    assert now.pop("unfinished_rebuild").startswith("gen-") and not info.pop("unfinished_rebuild")
    assert {k: v for k, v in now.items() if k != "updated"} == {
        k: v for k, v in info.items() if k != "updated"
    }
    summary = hits_of(cli("align-audio", "--json"))[0]
    # resumed: the recording committed before the interrupt is not embedded again
    assert summary["updated"] == 2 and summary["files"] == 6
    assert hits_of(cli("info", "--json"))[0]["modalities"]["audio"]["files"] == 3
    assert [Path(f["path"]).name for f in hits_of(cli("failures", "--json"))] == ["corrupt.wav"]


def test_audio_query_on_index_without_audio(tiny_model, tmp_path):
    make_image(tmp_path / "only" / "a.png", pattern=1)
    cli("index", tmp_path / "only", "--model", tiny_model, "--index", "imgs")
    wav = tone(tmp_path / "q.wav", 300, 1.0)
    r = cli("search", "--audio", wav, "--index", "imgs")
    assert r.exit_code != 0 and "no audio model" in r.stderr
