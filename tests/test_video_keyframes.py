"""Keyframes first: which frames the video loader decodes, and that the shots stay where the cuts
are (a cut on a keyframe, a cut inside a group of pictures, a file with a single keyframe)."""

from __future__ import annotations

import numpy as np
import pytest
from videos import make_video, picture

from mmsearch.loaders.video import Sampling, VideoInfo, iter_shots

SLACK = Sampling().step_s + 0.2  # as in test_video_loader: a step and a frame or two
NEW = Sampling()
OLD = Sampling(keyframes=False)  # every frame others refer to, as before the keyframe pass


def shots_of(path, sampling=NEW):
    info = VideoInfo()
    return list(iter_shots(path, sampling=sampling, info=info)), info


def keyframe_seconds(path) -> list[float]:
    """The seconds of the packets the demuxer flags as keyframes (what the encoder wrote)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sorted(
            round(float(p.pts * s.time_base), 2) for p in c.demux(s) if p.size and p.is_keyframe
        )


def looks_like(img, scene) -> bool:
    want = picture(scene, img.size).astype(int)
    return np.abs(np.asarray(img).astype(int) - want).mean() < 25


def test_cuts_on_keyframes_cost_only_the_keyframes(tmp_path):
    # A keyframe every second (a phone's short fixed group of pictures); the cuts fall on two.
    p = make_video(tmp_path / "phone.mkv", [(1, 3), (2, 4), (3, 3)], gop=10, tone=None)
    assert keyframe_seconds(p) == [float(s) for s in range(10)]
    shots, info = shots_of(p)
    assert [(s.start, s.end) for s in shots] == [(0, 3), (3, 7), (7, 10)]
    assert [looks_like(s.frame, k) for s, k in zip(shots, (1, 2, 3), strict=True)] == [True] * 3
    assert info.spans == [] and info.frames == 10  # the 10 keyframes of 100 frames, no more
    old, old_info = shots_of(p, OLD)
    assert [(s.start, s.end) for s in old] == [(0, 3), (3, 7), (7, 10)]
    assert old_info.frames > 5 * info.frames


def test_cut_inside_a_group_is_found_by_decoding_that_group(tmp_path):
    # Keyframes every second, cuts half-way between two: only the two groups that hold a cut
    # (different keyframes, one packet coded almost from scratch) are decoded inside.
    p = make_video(tmp_path / "clip.mp4", [(1, 3.5), (2, 4), (3, 3)], gop=10, tone=None)
    assert 3.5 not in keyframe_seconds(p) and 7.5 not in keyframe_seconds(p)
    shots, info = shots_of(p)
    assert info.spans == [(3.0, 4.0), (7.0, 8.0)]
    starts = [s.start for s in shots]
    assert len(shots) == 3 and 3.5 <= starts[1] <= 3.5 + SLACK and 7.5 <= starts[2] <= 7.5 + SLACK
    assert [looks_like(s.frame, k) for s, k in zip(shots, (1, 2, 3), strict=True)] == [True] * 3
    old, old_info = shots_of(p, OLD)
    assert [s.start for s in old] == starts and old_info.frames > 2 * info.frames


def test_single_keyframe_falls_back_to_decoding_the_whole_video(tmp_path):
    p = make_video(tmp_path / "long-gop.mkv", [(1, 12), (2, 12)], fps=5, gop=1000, tone=None)
    assert keyframe_seconds(p) == [0.0]
    shots, info = shots_of(p)
    assert info.spans == [(0.0, 24.0)]  # the one group is longer than trust_gap_s
    assert len(shots) == 2 and 12 <= shots[1].start <= 12 + SLACK
    assert [looks_like(s.frame, k) for s, k in zip(shots, (1, 2), strict=True)] == [True, True]
    old, old_info = shots_of(p, OLD)
    assert [(s.start, s.end) for s in old] == [(s.start, s.end) for s in shots]
    # The same frames, and the keyframe once more (the first pass decoded it too).
    assert info.frames == old_info.frames + 1
    # Trusting longer groups, the last group (no keyframe closes it) is still decoded: the
    # packet after the cut stands out.
    trusting, trusting_info = shots_of(p, Sampling(trust_gap_s=30))
    assert len(trusting) == 2 and trusting_info.spans == [(0.0, 24.0)]


def test_static_video_decodes_its_keyframes_only(tmp_path):
    p = make_video(
        tmp_path / "talk.mkv", [((120, 120, 120), 60)], gop=30, noise=20, tone=None, size=(32, 32)
    )
    keys = keyframe_seconds(p)
    shots, info = shots_of(p)
    old, old_info = shots_of(p, OLD)
    assert info.spans == [] and info.frames == len(keys) < 30
    assert old_info.frames == 600  # no B-frames to skip: every frame decoded
    # The floor holds on both: a frame at least every 30 s, each shot at most 30 s.
    for got in (shots, old):
        assert 2 <= len(got) <= 3 and max(s.end - s.start for s in got) <= 30
        assert got[-1].end == pytest.approx(60, abs=0.11)


def test_short_scene_on_a_keyframe_too_soon_gets_a_frame_from_inside(tmp_path):
    # Keyframes every 1.5 s on the cuts; scenes 2 and 3 last 1.5 s, less than the shortest shot
    # (2 s): their keyframes come too soon, so each gets the first frame at least 2 s into the
    # shot before it, decoded from inside its group (up to that frame only), as before.
    scenes = [(1, 3), (2, 1.5), (3, 1.5), (4, 3)]
    p = make_video(tmp_path / "edit.mkv", scenes, gop=15, tone=None)
    assert keyframe_seconds(p) == [0.0, 1.5, 3.0, 4.5, 6.0, 7.5]
    shots, info = shots_of(p)
    old, _ = shots_of(p, OLD)
    assert [s.start for s in shots] == [s.start for s in old]
    assert [looks_like(s.frame, k) for s, k in zip(shots, (1, 2, 3, 4), strict=True)] == [True] * 4
    assert [a for a, _ in info.spans] == [4.5, 6.0]
    assert all(b == s.start for (_, b), s in zip(info.spans, shots[2:], strict=True))


def test_no_keyframe_decoded_falls_back_to_the_whole_video(tmp_path, monkeypatch):
    # A demuxer that flags no packet as a keyframe (or a decoder that skips them all): the
    # first pass finds nothing, and the whole video is decoded as before.
    from mmsearch.loaders import video_frames

    p = make_video(tmp_path / "clip.mp4", [(1, 3), (2, 3)], tone=None)
    monkeypatch.setattr(video_frames.FrameSource, "_keyframes", lambda self: iter(()))
    shots, info = shots_of(p)
    old, old_info = shots_of(p, OLD)
    assert [(s.start, s.end) for s in shots] == [(s.start, s.end) for s in old]
    assert len(shots) == 2 and info.frames == old_info.frames == 60
