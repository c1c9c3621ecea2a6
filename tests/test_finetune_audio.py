"""Audio projector fine-tuning on (audio, caption) pairs, with tiny CLIP and CLAP models."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import make_tone
from test_audio_tower import make_tiny_clap, make_tiny_clip
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.config import EncoderOptions, ModelSpec
from mmsearch.encoders.clap import (
    PROJECTOR_FILENAME,
    FitSettings,
    load_audio_tower,
    load_projector,
)
from mmsearch.encoders.clap import projector as clap_projector
from mmsearch.finetune.audio import train_audio_projector
from mmsearch.finetune.pairs import Pair, PairSet, split_by_file
from mmsearch.records import AUDIO

CLASSES = {
    220.0: ["a low hum", "deep droning bass", "a low rumble"],
    440.0: ["a steady beep", "a plain middle tone", "a beeping alarm"],
    880.0: ["a high whistle", "a shrill pitch", "a piercing squeal"],
    1760.0: ["a very high chirp", "a tiny bird tweet", "a thin hiss"],
}
FAST = FitSettings(refine_steps=20)


tone = make_tone


@pytest.fixture
def setup(tmp_path, monkeypatch):
    few = clap_projector.read_captions()[::12]
    monkeypatch.setattr(clap_projector, "read_captions", lambda: few)
    clip_dir = make_tiny_clip(tmp_path / "clip")
    clap_dir = make_tiny_clap(tmp_path / "clap")
    media = tmp_path / "media"
    media.mkdir()
    pairs = []
    for c, (freq, caps) in enumerate(CLASSES.items()):
        for i in range(6):
            p = tone(media / f"c{c}_{i}.wav", freq * (1 + 0.01 * i), 1.0 + 0.2 * i, seed=c * 10 + i)
            pairs += [Pair(p, cap, AUDIO) for cap in caps[:2] if cap]
    (media / "bad.wav").write_bytes(b"not audio at all")
    pairs.append(Pair(media / "bad.wav", "broken", AUDIO))
    return tmp_path, clip_dir, clap_dir, PairSet(pairs)


def test_trains_saves_and_is_picked_up(setup):
    from mmsearch.encoders.clip import load_clip

    root, clip_dir, clap_dir, pairs = setup
    events = []
    result = train_audio_projector(
        pairs,
        clip_dir,
        str(clap_dir),
        root / "cache",
        val_fraction=0.25,
        progress=lambda event, **info: events.append(event),
        settings=FAST,
    )
    saved = clip_dir / PROJECTOR_FILENAME
    assert result.projector == saved and saved.is_file()
    assert result.skipped == {"undecodable": 1}
    assert result.train_pairs + result.val_pairs == 48
    assert result.val_pairs == 12 and result.before.images == result.after.images == 6
    assert result.after.mean >= result.before.mean
    assert "embed-audio" in events and "fit" in events

    enc = load_clip(ModelSpec.parse(str(clip_dir)), EncoderOptions(device="cpu", precision="fp32"))
    tower = load_audio_tower(str(clap_dir), enc, root / "other-cache")
    assert tower.projector.hash == load_projector(saved).hash
    assert tower.identity.details["projector_fit"] in ("finetuned", "ridge", "ridge+contrastive")
    assert not list((root / "other-cache").glob("*.safetensors"))  # no bridge fit was needed
    assert result.to_dict()["kept"] == result.kept

    # `mmsearch eval` on the held-out pairs, with the model directory alone (it names its audio
    # model), measures what training measured for the projector it kept.
    usable = PairSet([p for p in pairs.pairs if p.path.name != "bad.wav"])
    _, val = split_by_file(usable, 0.25, 0)
    val_csv = root / "val.csv"
    with open(val_csv, "w", newline="") as f:
        csv.writer(f).writerows(
            [("path", "caption")] + [(str(p.path), p.caption) for p in val.pairs]
        )
    r = CliRunner().invoke(app, ["eval", str(val_csv), "--model", str(clip_dir), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["audio"] == result.to_dict()[result.kept]


def test_no_audio_pairs_is_a_usage_error(tmp_path):
    from mmsearch.errors import UsageError

    with pytest.raises(UsageError, match="no audio pairs"):
        train_audio_projector(PairSet([]), tmp_path, None, tmp_path)
