"""embed_videos with a deterministic fake encoder: which units a video gives (shots through the
image tower, the soundtrack as audio units), and what happens when a part is missing or bad."""

from __future__ import annotations

import numpy as np
import pytest
from videos import make_video

from mmsearch.config import AudioWindowing, ImagePrep
from mmsearch.embed import Embedded, embed_loaded
from mmsearch.encoders import Encoder, EncoderIdentity, Tower
from mmsearch.errors import LoadError
from mmsearch.loaders import Loaded
from mmsearch.loaders import audio as audio_loader
from mmsearch.records import FileEntry

RED, GREEN = (255, 0, 0), (0, 255, 0)


class MeanColour(Tower):
    """A frame's mean colour (and a constant, so black is not a zero vector)."""

    dim = 4

    def embed_batch(self, batch):
        return np.array([[*np.asarray(x, float).reshape(-1, 3).mean(0), 1.0] for x in batch])


class Loudness(Tower):
    dim = 4

    def embed_batch(self, batch):
        return np.array([[np.sqrt(np.mean(np.square(w))), 0, 0, 1.0] for w in batch])


def fake_encoder(audio: bool = True) -> Encoder:
    return Encoder(
        identity=EncoderIdentity("fake"), dim=4, image=MeanColour(), audio=Loudness() if audio else None,
        prep=ImagePrep(size=(16, 16)), audio_windows=AudioWindowing(16000, 2.0, 1.5),
    )  # fmt: skip


def embed(path, audio: bool = True):
    item = Loaded(FileEntry(bytes(path), "video", 1, 1), "hash")
    (result,) = embed_loaded(fake_encoder(audio), [item], 8, lambda n: None)
    return result


def test_shots_then_soundtrack_windows(tmp_path):
    p = make_video(tmp_path / "v.mp4", [(RED, 3), (GREEN, 3)], tone=440.0)
    r = embed(p)
    assert isinstance(r, Embedded) and r.warning is None
    shots = [s for s in r.segments if s.modality is None]
    sound = [s for s in r.segments if s.modality == "audio"]
    assert [(s.start, round(s.end, 1)) for s in shots] == [(0.0, 3.0), (3.0, 6.0)]
    assert [(s.start, s.end) for s in sound][:2] == [(0.0, 2.0), (1.5, 3.5)]
    assert sound[-1].end == pytest.approx(6.0, abs=0.1) and len(sound) == 4
    assert r.segments == shots + sound and r.vectors.shape == (6, 4)
    # the frames' vectors are their scenes' colours, the windows' the tone's loudness
    red, green = r.vectors[0], r.vectors[1]
    assert red[0] > 0.8 and green[1] > 0.8
    assert np.allclose(r.vectors[2:, 1:3], 0) and (r.vectors[2:, 0] > 0.1).all()


def test_silent_video_keeps_its_frames_quietly(tmp_path):
    r = embed(make_video(tmp_path / "v.mkv", [(RED, 2)], tone=None))
    assert [s.modality for s in r.segments] == [None] and r.warning is None


def test_undecodable_soundtrack_keeps_the_frames_and_says_so(tmp_path, monkeypatch):
    p = make_video(tmp_path / "v.mp4", [(RED, 2)], tone=440.0)

    def damaged(*args, **kwargs):
        raise LoadError("audio data is damaged (invalid data); 0.0 s decoded before the damage")
        yield  # a generator, as iter_windows is

    monkeypatch.setattr(audio_loader, "iter_windows", damaged)
    r = embed(p)
    assert [s.modality for s in r.segments] == [None]
    assert r.warning == "soundtrack not indexed: audio data is damaged (invalid data); 0.0 s " \
        "decoded before the damage"  # fmt: skip


def test_without_an_audio_tower_only_frames(tmp_path):
    r = embed(make_video(tmp_path / "v.mp4", [(RED, 2)], tone=440.0), audio=False)
    assert [s.modality for s in r.segments] == [None] and r.warning is None


def test_sound_only_file(tmp_path):
    p = make_video(tmp_path / "voice.webm", [(RED, 3)], tone=300.0, video=False)
    r = embed(p)
    assert {s.modality for s in r.segments} == {"audio"} and len(r.segments) == 2
    assert embed(p, audio=False) == "no video stream (sound only, and no audio model)"


def test_bad_videos_are_reasons_or_partial(tmp_path):
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    assert embed(junk).startswith("not a readable MKV file")
    whole = make_video(tmp_path / "whole.mkv", [(RED, 4), (GREEN, 4)], tone=None)
    short = tmp_path / "short.mkv"
    short.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    r = embed(short)
    assert isinstance(r, Embedded) and "are kept" in r.warning
