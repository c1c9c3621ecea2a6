"""Video decoding: which shots come back, at which seconds, with which frame; every kind of bad
video; the soundtrack read through PyAV."""

from __future__ import annotations

import numpy as np
import pytest
from videos import FORMATS, make_video, picture

from mmsearch.config import ImagePrep
from mmsearch.errors import LoadError
from mmsearch.loaders import ffmpeg, video_frames
from mmsearch.loaders.ffmpeg import AudioReader, open_media
from mmsearch.loaders.video import Sampling, VideoInfo, iter_shots

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# A cut is seen at the first compared frame after it: within a step and a frame or two
# (AVI and B-frames move what is decoded by a frame).
SLACK = Sampling().step_s + 0.2


def shots_of(path, **kw):
    info = VideoInfo()
    shots = list(iter_shots(path, info=info, **kw))
    return shots, info


def colour(img) -> tuple[int, int, int]:
    return tuple(int(round(c)) for c in np.asarray(img).reshape(-1, 3).mean(0))


def spans(shots):
    return [(s.start, s.end) for s in shots]


def test_three_scenes_three_shots_at_their_seconds(tmp_path):
    p = make_video(tmp_path / "clip.mp4", [(RED, 7), (GREEN, 7), (BLUE, 6)])
    shots, info = shots_of(p)
    assert len(shots) == 3
    (s0, e0), (s1, e1), (s2, e2) = spans(shots)
    assert s0 == 0 and e0 == s1 and e1 == s2  # the shots tile the video
    assert 7 <= s1 <= 7 + SLACK and 14 <= s2 <= 14 + SLACK
    assert e2 == pytest.approx(20, abs=0.11)
    assert info.duration == e2 and info.notes == []
    # Each shot keeps a frame of its own scene, whole (no prep: a PIL image of the video's size).
    for shot, want in zip(shots, (RED, GREEN, BLUE), strict=True):
        assert shot.frame.size == (64, 48)
        assert np.abs(np.subtract(colour(shot.frame), want)).max() <= 6
    # The encoder put keyframes at the cuts: only keyframes were decoded (one every 1.2 s, the
    # codec's group of pictures), none of the 200 frames between them.
    assert info.spans == [] and info.frames == info.candidates <= 20 / 1.2 + 3
    # Without the keyframe pass, every frame is decoded and a few a second compared.
    old, old_info = shots_of(p, sampling=Sampling(keyframes=False))
    assert spans(old) == spans(shots) and old_info.frames == 200
    assert old_info.candidates <= 20 / Sampling().step_s + 1


@pytest.mark.parametrize("ext", sorted(ext for ext, (_, video, _) in FORMATS.items() if video))
def test_every_container_decodes(tmp_path, ext):
    p = make_video(tmp_path / f"clip{ext}", [(1, 3), (2, 3)])
    shots, info = shots_of(p)
    assert len(shots) == 2 and 3 <= shots[1].start <= 3 + SLACK
    assert info.duration == pytest.approx(6, abs=0.11)


def test_kept_frame_is_the_image_tower_input(tmp_path):
    p = make_video(tmp_path / "clip.mkv", [(5, 2)], size=(160, 96))
    prep = ImagePrep(size=(32, 32))
    (shot,) = iter_shots(p, prep)
    assert shot.frame.dtype == np.uint8 and shot.frame.shape == (32, 32, 3)
    # The pattern's centre, shrunk like a photo of the same picture (within codec loss).
    from PIL import Image

    from mmsearch.loaders.image import resize_crop

    photo = resize_crop(Image.fromarray(picture(5, (160, 96))), prep)
    assert np.abs(shot.frame.astype(int) - photo).mean() < 12


def test_noisy_static_scene_is_merged_into_one_shot(tmp_path):
    p = make_video(tmp_path / "noisy.mp4", [((120, 120, 120), 12), (9, 4)], noise=20)
    shots, _ = shots_of(p)
    assert len(shots) == 2 and 12 <= shots[1].start <= 12 + SLACK


def test_ceiling_a_strobe_costs_at_most_max_per_minute(tmp_path):
    # A cut every half second for 20 s: 40 scenes, but at most one shot per 60/30 = 2 s.
    scenes = [((255, 255, 255) if i % 2 else (0, 0, 0), 0.5) for i in range(40)]
    shots, _ = shots_of(make_video(tmp_path / "strobe.mp4", scenes))
    assert len(shots) <= 10
    assert all(s.end - s.start >= 2 - 1e-9 for s in shots[:-1])
    # Fewer allowed per minute: fewer shots.
    fewer, _ = shots_of(tmp_path / "strobe.mp4", sampling=Sampling(max_per_minute=12))
    assert len(fewer) <= 4


def test_floor_a_static_video_gets_a_frame_every_30_s(tmp_path):
    p = make_video(tmp_path / "talk.mp4", [((90, 90, 200), 70)], fps=2, size=(32, 32))
    shots, _ = shots_of(p)
    assert [round(s) for s in sum(spans(shots), ())] == [0, 30, 30, 60, 60, 70]
    # At most 15 s a shot: keyframes come every 6 s (none decoded between), so a shot ends at
    # the last keyframe that keeps it within 15 s.
    shots, _ = shots_of(p, sampling=Sampling(min_per_minute=4))
    assert [s.start for s in shots] == [0, 12, 24, 36, 48, 60]
    assert max(s.end - s.start for s in shots) <= 15
    shots, _ = shots_of(p, sampling=Sampling(min_per_minute=4, keyframes=False))
    assert len(shots) == 5 and max(s.end - s.start for s in shots) <= 15


def test_one_frame_video_is_one_shot(tmp_path):
    p = make_video(tmp_path / "one.mp4", [(RED, 0.1)], tone=None)
    shots, info = shots_of(p)
    assert len(shots) == 1 and shots[0].start == 0 and shots[0].end == pytest.approx(0.1)


def test_display_rotation_is_applied(tmp_path):
    # Stored landscape, top half red: shown rotated a quarter turn (a phone held upright).
    img = np.zeros((48, 64, 3), np.uint8)
    img[:24], img[24:] = RED, BLUE
    scene = tmp_path / "scene.png"
    from PIL import Image

    Image.fromarray(img).save(scene)
    p = tmp_path / "portrait.mp4"
    _write_picture_video(p, img, rotation=-90)
    (shot,) = iter_shots(p)
    assert shot.frame.size == (48, 64)  # portrait
    a = np.asarray(shot.frame).astype(int)
    # -90 in the display matrix: turned clockwise, so the stored top is on the right.
    assert np.abs(a[:, 30:].reshape(-1, 3).mean(0) - RED).max() < 20
    assert np.abs(a[:, :18].reshape(-1, 3).mean(0) - BLUE).max() < 20


def _write_picture_video(path, img, rotation):
    import av

    with av.open(str(path), "w") as out:
        v = out.add_stream("mpeg4", rate=5)
        v.width, v.height = img.shape[1], img.shape[0]
        v.set_display_rotation(rotation)
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(img, "rgb24")
            frame.pts = i
            out.mux(v.encode(frame))
        out.mux(v.encode(None))


def test_sound_only_file_has_no_shots(tmp_path):
    p = make_video(tmp_path / "voice.mp4", [(RED, 3)], video=False)
    shots, info = shots_of(p)
    assert shots == [] and info.has_video is False


def test_random_bytes_named_video_fail_with_reason(tmp_path):
    p = tmp_path / "junk.mp4"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
    with pytest.raises(LoadError, match="not a readable MP4 file: invalid data"):
        list(iter_shots(p))
    (tmp_path / "empty.mkv").write_bytes(b"")
    with pytest.raises(LoadError, match="empty file"):
        list(iter_shots(tmp_path / "empty.mkv"))


def test_misnamed_file_is_read_as_its_extension_says(tmp_path):
    # A Matroska file named .mp4 is not probed into something else: it fails as an MP4.
    p = make_video(tmp_path / "clip.mkv", [(RED, 1)])
    q = tmp_path / "clip.mp4"
    q.write_bytes(p.read_bytes())
    with pytest.raises(LoadError, match="not a readable MP4 file"):
        list(iter_shots(q))


def test_truncated_matroska_keeps_what_decodes(tmp_path):
    p = make_video(tmp_path / "clip.mkv", [(RED, 5), (GREEN, 5), (BLUE, 5)], tone=None)
    data = p.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 3 // 5])
    shots, info = shots_of(cut)
    # The first scenes are there; the end is where the data stops, not the header's 15 s.
    assert [colour(s.frame)[1] > 200 for s in shots[:2]] == [False, True]
    assert 5 + SLACK < info.duration < 15
    assert info.notes == [
        f"the frames end at {info.duration:.1f} s but the header says 15.0 s; "
        f"the shots of the first {info.duration:.1f} s are kept"
    ]


def test_truncated_mp4_without_its_index_fails_with_reason(tmp_path):
    # PyAV writes the MP4 index (moov) at the end: without it nothing can be located.
    p = make_video(tmp_path / "clip.mp4", [(RED, 5), (GREEN, 5)])
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(p.read_bytes()[:-2000])
    with pytest.raises(LoadError, match="not a readable MP4 file"):
        list(iter_shots(cut))


def test_damage_halfway_keeps_the_shots_before_it(tmp_path):
    p = make_video(tmp_path / "clip.mkv", [(RED, 5), (GREEN, 5)], tone=None)
    data = bytearray(p.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = (
        np.random.default_rng(1).integers(0, 256, 4000, np.uint8).tobytes()
    )
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(bytes(data))
    shots, info = shots_of(bad)  # no exception: what decodes is kept
    assert shots and colour(shots[0].frame)[0] > 200


def test_header_with_huge_frames_is_refused_before_decoding(tmp_path, monkeypatch):
    p = make_video(tmp_path / "clip.mp4", [(RED, 1)])
    monkeypatch.setattr(ffmpeg, "MAX_FRAME_PIXELS", 64 * 48 - 1)
    with pytest.raises(LoadError, match=r"video frame too large: 64x48 pixels"):
        list(iter_shots(p))


def test_header_claiming_too_many_frames_is_refused(tmp_path, monkeypatch):
    p = make_video(tmp_path / "clip.mp4", [(RED, 2)])
    monkeypatch.setattr(ffmpeg, "MAX_FRAMES", 19)
    with pytest.raises(LoadError, match="video too long: its header says 20 frames"):
        list(iter_shots(p))


def test_decode_budget_stops_a_file_and_keeps_what_was_decoded(tmp_path, monkeypatch):
    p = make_video(tmp_path / "clip.mp4", [(RED, 3), (GREEN, 3), (BLUE, 3)], tone=None)

    class SlowClock:  # every frame takes a second
        now = 0.0

        def monotonic(self):
            self.now += 1.0
            return self.now

    monkeypatch.setattr(video_frames, "time", SlowClock())
    monkeypatch.setattr(video_frames, "DECODE_S_PER_S", 0.0)
    shots, info = shots_of(p, time_budget_s=40, sampling=Sampling(keyframes=False))
    assert info.frames == 41  # 40 frames of a second each, and the one that went over
    assert len(shots) == 2 and shots[-1].end == pytest.approx(4.1)
    assert info.notes == ["decoding took longer than 40 s; the shots of the first 4.1 s are kept"]


def test_settings_are_checked():
    with pytest.raises(ValueError):
        Sampling(min_per_minute=10, max_per_minute=5)
    with pytest.raises(ValueError):
        Sampling(change=0)


def test_unknown_extension_has_no_demuxer(tmp_path):
    p = tmp_path / "clip.xyz"
    p.write_bytes(b"1234")
    with pytest.raises(LoadError, match="no demuxer for .xyz"):
        list(iter_shots(p))


# --- the soundtrack, read through PyAV -------------------------------------------------------


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".webm"])
def test_soundtrack_is_read_like_a_sound_file(tmp_path, ext):
    p = make_video(tmp_path / f"clip{ext}", [(RED, 2)], tone=500.0)
    with open_media(p, None) as container:
        reader = AudioReader(container)
        rate = reader.samplerate
        assert reader.channels == 1 and rate in (16000, 48000)
        assert reader.frames == pytest.approx(2 * rate, rel=0.05)
        blocks = [reader.read(1000)]
        while len(blocks[-1]):
            blocks.append(reader.read(1000))
    assert all(len(b) == 1000 for b in blocks[:-2])  # exact block sizes until the end
    audio = np.concatenate(blocks)[:, 0]
    assert blocks[-1].shape == (0, 1) and audio.dtype == np.float32
    assert len(audio) == pytest.approx(2 * rate, rel=0.05)
    # A 500 Hz sine of amplitude 0.3 (the codec's priming at the start aside).
    body = audio[rate // 4 : rate]
    spectrum = np.abs(np.fft.rfft(body))
    assert np.argmax(spectrum) * rate / len(body) == pytest.approx(500, abs=3)
    assert np.abs(body).max() == pytest.approx(0.3, abs=0.03)


def test_no_audio_stream_is_a_reason(tmp_path):
    p = make_video(tmp_path / "silent.mp4", [(RED, 1)], tone=None)
    with open_media(p, None) as container, pytest.raises(LoadError, match="no audio stream"):
        AudioReader(container)
