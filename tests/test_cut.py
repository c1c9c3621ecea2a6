"""Cutting a moment out of a video or recording: the written file plays, holds the moment's
pictures and sound, and has the right length."""

from __future__ import annotations

import av
import numpy as np
import pytest
from videos import make_video

from mmsearch.errors import LoadError, UsageError
from mmsearch.loaders.cut import cut_clip

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SCENES = [(RED, 4), (GREEN, 4), (BLUE, 4)]


def played(path):
    """(video frame times, their mean colours, seconds of sound) of a written file."""
    with av.open(str(path)) as c:
        frames = [
            (float(f.time), f.to_ndarray(format="rgb24").reshape(-1, 3).mean(0))
            for f in c.decode(video=0)
        ] if c.streams.video else []  # fmt: skip
    with av.open(str(path)) as c:
        sound = (
            sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].sample_rate
            if c.streams.audio
            else 0.0
        )
    return [t for t, _ in frames], [rgb for _, rgb in frames], sound


def near(rgb, want) -> bool:
    return bool(np.abs(np.asarray(rgb) - want).max() < 30)


def test_copy_starts_at_the_keyframe_and_holds_the_moment(tmp_path):
    src = make_video(tmp_path / "clip.mkv", SCENES, gop=5)  # a keyframe every 0.5 s
    cut = cut_clip(src, 4.2, 8.0, tmp_path / "out.mkv")
    assert cut.copied and cut.start == pytest.approx(4.0)  # the keyframe before 4.2
    times, colours, sound = played(tmp_path / "out.mkv")
    # The green scene from its start, and nothing before it. A copy can end a few frames late
    # (B-frames shown before the end refer to a frame after it): what it says it holds.
    assert times[0] == 0 and times[40] == pytest.approx(4.0)
    assert all(near(c, GREEN) for c in colours[:40])
    assert 8.0 <= cut.end <= 8.5 and times[-1] + 0.1 == pytest.approx(cut.end - cut.start)
    assert sound == pytest.approx(4.0, abs=0.1)


def test_far_keyframe_means_reencoding_from_the_exact_second(tmp_path):
    # Keyframes only where the scenes start (the encoder puts one at each cut).
    src = make_video(tmp_path / "clip.mp4", SCENES, gop=1000)
    cut = cut_clip(src, 5.5, 7.5, tmp_path / "out.mp4")
    assert not cut.copied and (cut.start, cut.end) == (pytest.approx(5.5), pytest.approx(7.5))
    times, colours, sound = played(tmp_path / "out.mp4")
    assert len(times) == 20 and times[0] == 0 and times[-1] == pytest.approx(1.9)
    assert all(near(c, GREEN) for c in colours)
    assert sound == pytest.approx(2.0, abs=0.05)


def test_copy_false_reencodes_even_when_copying_would_do(tmp_path):
    src = make_video(tmp_path / "clip.mkv", SCENES, gop=5)
    cut = cut_clip(src, 8.0, 9.0, tmp_path / "out.mkv", copy=False)
    assert not cut.copied
    times, colours, _ = played(tmp_path / "out.mkv")
    assert len(times) == 10 and all(near(c, BLUE) for c in colours)


def test_codec_the_output_cannot_hold_is_reencoded(tmp_path):
    # MPEG-4 Part 2 cannot go in WebM: VP9 and Opus instead.
    src = make_video(tmp_path / "clip.mp4", SCENES, gop=5)
    cut = cut_clip(src, 0.0, 2.0, tmp_path / "out.webm")
    assert not cut.copied
    with av.open(str(tmp_path / "out.webm")) as c:
        assert [s.codec_context.name for s in c.streams] == ["vp9", "opus"]
    times, colours, sound = played(tmp_path / "out.webm")
    assert len(times) == 20 and near(colours[0], RED)
    assert sound == pytest.approx(2.0, abs=0.05)
    with pytest.raises(UsageError, match="cannot copy the streams into .webm"):
        cut_clip(src, 0.0, 2.0, tmp_path / "copied.webm", copy=True)
    assert not (tmp_path / "copied.webm").exists()


def test_sound_of_a_video_to_a_wav(tmp_path):
    src = make_video(tmp_path / "clip.mp4", SCENES)
    cut = cut_clip(src, 1.5, 4.0, tmp_path / "moment.wav")
    assert (cut.start, cut.end) == (pytest.approx(1.5), pytest.approx(4.0))
    times, _, sound = played(tmp_path / "moment.wav")
    assert times == [] and sound == pytest.approx(2.5, abs=1e-3)


def test_recording_to_its_own_format_is_copied(tmp_path):
    src = make_video(tmp_path / "memo.m4v", SCENES, video=False)
    cut = cut_clip(src, 2.0, 3.0, tmp_path / "memo.m4a")
    assert cut.copied and cut.start <= 2.0 and cut.end >= 3.0
    _, _, sound = played(tmp_path / "memo.m4a")
    assert sound == pytest.approx(cut.end - cut.start, abs=0.07)


def test_end_past_the_video_stops_at_its_end(tmp_path):
    src = make_video(tmp_path / "clip.mp4", SCENES, gop=1000)
    cut = cut_clip(src, 11.0, 99.0, tmp_path / "out.mp4")
    assert cut.end == pytest.approx(12.0, abs=0.1)
    times, colours, _ = played(tmp_path / "out.mp4")
    assert len(times) == 10 and near(colours[-1], BLUE)


@pytest.mark.parametrize(
    "start, end, out, message",
    [
        (3.0, 2.0, "out.mp4", "need 0 <= start < end"),
        (-1.0, 2.0, "out.mp4", "need 0 <= start < end"),
        (20.0, 30.0, "out.mp4", r"start=20 s is past the end \(12.0 s\)"),
        (0.0, 1.0, "out.txt", "cannot write .txt clips"),
        (0.0, 1.0, "clip.mp4", "is the source itself"),
    ],
)
def test_bad_requests_are_refused(tmp_path, start, end, out, message):
    src = make_video(tmp_path / "clip.mp4", SCENES)
    before = src.read_bytes()
    with pytest.raises(UsageError, match=message):
        cut_clip(src, start, end, tmp_path / out)
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_unreadable_source_leaves_no_output(tmp_path):
    src = tmp_path / "junk.mp4"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 10_000, np.uint8).tobytes())
    with pytest.raises(LoadError, match="not a readable MP4 file"):
        cut_clip(src, 0.0, 1.0, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()
    silent = make_video(tmp_path / "silent.mp4", SCENES, tone=None)
    with pytest.raises(LoadError, match="no audio stream to cut"):
        cut_clip(silent, 0.0, 1.0, tmp_path / "out.wav")


@pytest.mark.parametrize("copy", [None, False])
def test_display_rotation_is_kept(tmp_path, copy):
    src = make_video(tmp_path / "phone.mp4", SCENES, gop=5, rotation=-90)
    cut = cut_clip(src, 1.0, 2.0, tmp_path / "out.mp4", copy=copy)
    assert cut.copied is (copy is None)
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert next(c.decode(video=0)).rotation == -90
