"""Video decoding: a video file -> its shots, each a start/end in seconds and one kept frame.

Candidate frames come in time order from loaders.video_frames (keyframes first, the frames of a
group of pictures only where a cut may hide inside it; streamed: a few decoded frames and
thumbnails are held, whatever the video's length). Each candidate is shrunk to a 32x18 thumbnail
(cheap, in FFmpeg) and compared with the thumbnail of the current shot's frame. A candidate that
differs by more than `change` (mean absolute difference, 0-1) starts a new shot, one that does
not is merged into the shot. Two bounds make the number of shots per minute predictable: a shot
lasts at least 60 / max_per_minute s (a new shot waits until then: a strobe costs at most
max_per_minute frames a minute) and at most 60 / min_per_minute s (a static talk still gets a
frame every 30 s, so every moment has a place to be found at). The first frame of a shot is the
one kept, turned the way the video is shown (its rotation) and prepared for the image tower like
a photo (resized by FFmpeg: see `_prepared`). A shot's start and end are times of frames actually
decoded; where a group of pictures was not decoded inside, a cut is known only to that group's
precision (see video_frames).

Damage is not fatal: a video that stops decoding halfway keeps the shots before the damage (and
says so in `VideoInfo.notes`); one that yields no frame at all raises LoadError with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LoadError
from .ffmpeg import check_video_header, ffmpeg_reason, media_origin, open_media
from .files import DEFAULT_DECODE_BUDGET_S
from .image import center_crop_or_pad, resize_crop, resized_size
from .video_frames import FrameSource, thumb_difference


@dataclass(frozen=True)
class Sampling:
    """How frames are chosen (see the module docstring)."""

    min_per_minute: float = 2.0  # a shot lasts at most 60 / this seconds
    max_per_minute: float = 30.0  # a shot lasts at least 60 / this seconds
    step_s: float = 0.25  # a decoded frame is compared at most this often
    change: float = 0.15  # thumbnail difference (0-1) that starts a new shot
    # Two alike keyframes at most this far apart are taken to bound one scene (x264's default
    # keyframe interval is 250 frames: 8.3 s at 30 fps); a longer group is decoded inside.
    trust_gap_s: float = 10.0
    keyframes: bool = True  # False: decode every frame others refer to (no keyframe pass)

    def __post_init__(self):
        if not 0 < self.min_per_minute <= self.max_per_minute:
            raise ValueError("need 0 < min_per_minute <= max_per_minute")
        if self.step_s <= 0 or not 0 < self.change < 1 or self.trust_gap_s <= 0:
            raise ValueError("need step_s > 0, 0 < change < 1 and trust_gap_s > 0")

    @property
    def max_shot_s(self) -> float:
        return 60.0 / self.min_per_minute

    @property
    def min_shot_s(self) -> float:
        return 60.0 / self.max_per_minute


@dataclass(frozen=True)
class Shot:
    start: float  # seconds from the start of the video
    end: float
    frame: Any  # the kept frame: model input (uint8 H x W x 3) with a prep, else a PIL image


@dataclass
class VideoInfo:
    """Filled in by `iter_shots` as it runs; complete once the iterator is exhausted."""

    duration: float = 0.0  # seconds of video read
    frames: int = 0  # frames decoded
    candidates: int = 0  # frames compared
    spans: list[tuple[float, float]] = field(default_factory=list)  # groups decoded inside
    has_video: bool = True  # False for a file with no video stream (sound only)
    notes: list[str] = field(default_factory=list)  # what a user may want to know (damage)


def iter_shots(
    path: bytes | str | os.PathLike,
    prep=None,
    sampling: Sampling = Sampling(),
    info: VideoInfo | None = None,
    time_budget_s: float | None = DEFAULT_DECODE_BUDGET_S,
) -> Iterator[Shot]:
    """Yield the shots of the video at `path` while decoding it. `prep` (config.ImagePrep)
    prepares each kept frame for the image tower; without it the frame is a PIL image.

    A file without a video stream yields nothing (`info.has_video` is False). Opening the file
    and each decoding step may take at most `time_budget_s` (in a process's main thread; see
    loaders.decode_budget), the whole file `time_budget_s` plus DECODE_S_PER_S per second of
    video; past that the shots decoded so far are kept and a note says so."""
    info = info if info is not None else VideoInfo()
    with ExitStack() as files:
        container = files.enter_context(open_media(path, time_budget_s))
        if not container.streams.video:
            info.has_video = False
            return
        stream = container.streams.video[0]
        check_video_header(container, stream)

        def reopen():  # the same file again, for decoding inside groups of pictures
            again = files.enter_context(open_media(path, time_budget_s))
            video = again.streams.video[0]
            check_video_header(again, video)
            return again, video

        source = FrameSource(
            container, stream, sampling, info, time_budget_s, reopen if sampling.keyframes else None
        )
        yield from _Sampler(source, stream, prep, sampling, info).shots()


class _Sampler:
    def __init__(self, source: FrameSource, stream, prep, sampling, info):
        from av.video.reformatter import VideoReformatter

        self.source, self.stream, self.prep = source, stream, prep
        self.sampling, self.info = sampling, info
        # Its own reformatters (one per size: FFmpeg rebuilds a scaler to change size).
        self.reformatter, self.resizer = VideoReformatter(), VideoReformatter()
        self.start = self.anchor = None  # the current shot's start and thumbnail
        source.held_until = self.held_until

    def held_until(self, t: float, thumb, next_t: float) -> float | None:
        """Where a candidate that differs from the current shot but is held back by the
        shortest shot could start one, if that is before `next_t` (the next candidate)."""
        s = self.sampling
        if self.anchor is None or thumb_difference(thumb, self.anchor) <= s.change:
            return None
        until = self.start + s.min_shot_s
        return until if t < until < next_t else None

    def shots(self) -> Iterator[Shot]:
        s = self.sampling
        kept = None
        for t, frame, thumb, next_t in self.source.candidates():
            self.info.candidates += 1
            if self.anchor is not None:
                start = self.start
                age = t - start
                # Where the next candidate is known to come later than the longest shot allows
                # (keyframes far apart), this one starts the next shot: shots never outgrow it.
                overrun = next_t is not None and next_t - start > s.max_shot_s
                if age < s.min_shot_s or (
                    age < s.max_shot_s
                    and not overrun
                    and thumb_difference(thumb, self.anchor) <= s.change
                ):
                    continue  # merged into the current shot
                yield Shot(start, t, kept)
            self.start, self.anchor = (0.0 if kept is None else t), thumb
            kept = self._keep(frame)
        start = self.start
        end, told = self.source.end, self.source.header_s
        if not self.info.notes and told is not None and end < told <= end + 1:
            end = told  # the last frames were not decoded (NONREF) or are shorter
        elif not self.info.notes and told is not None and end < 0.9 * told - 1:
            self.source.stop(f"the frames end at {end:.1f} s but the header says {told:.1f} s")
        self.info.duration = end
        if kept is None:
            reason = self.info.notes.pop() if self.info.notes else "no frame could be decoded"
            raise LoadError(f"no video frames: {reason}")
        yield Shot(start, max(end, start), kept)

    def _keep(self, frame):
        """The frame as shown (rotation applied), prepared for the image tower."""
        w, h = _display_size(frame, self.stream.sample_aspect_ratio)
        if self.prep is None:
            return _shown(frame, self.reformatter, w, h)
        if not self.prep.draft:
            return resize_crop(_shown(frame, self.reformatter, w, h), self.prep)
        # Shrunk by FFmpeg to twice the tower's input first (the same bound as JPEG draft
        # mode for photos), which is what costs little at 4K; then see _prepared.
        scale = min(1.0, 2 * min(self.prep.size) / min(w, h))
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        return _prepared(frame, (self.reformatter, self.resizer), w, h, self.prep)


def _prepared(frame, reformatters, w: int, h: int, prep) -> np.ndarray:
    """open_clip's eval transform of the frame shrunk to w x h by FFmpeg (as `_shown` does),
    with the bicubic resize done by FFmpeg's swscale as well where it shrinks, and the crop in
    numpy: a third cheaper than a PIL image and PIL's resize, and within cosine 0.9992 of them
    with a real model on the test videos (benchmarks/RESULTS.md, issue 12). PIL's path where
    the frame is enlarged or the model asks for another filter."""
    first, second = reformatters
    quarter = _QUARTERS.get(frame.rotation % 360, 0)
    rw, rh = resized_size(*((h, w) if quarter % 2 else (w, h)), prep)  # as shown
    rw, rh = (rh, rw) if quarter % 2 else (rw, rh)  # as stored
    if prep.interpolation != "bicubic" or rw > w or rh > h:
        return resize_crop(_shown(frame, first, w, h), prep)
    small = first.reformat(frame, w, h, "rgb24", interpolation="AREA", threads=1)
    a = second.reformat(small, rw, rh, "rgb24", interpolation="BICUBIC", threads=1).to_ndarray()
    a = np.rot90(a, quarter) if quarter else a
    return np.ascontiguousarray(center_crop_or_pad(a, *prep.size, prep.fill_color))


def frame_at(path: bytes | str | os.PathLike, seconds: float, side: int):
    """The picture shown `seconds` into the video at `path` (the first frame at or after that
    moment, turned as the video is shown) as a PIL image fitting in `side` x `side`: a hit's
    thumbnail. Seeks to the keyframe before, so it costs one group of pictures, not the video
    up to there. LoadError with a reason when there is no such frame."""
    import av
    from av.video.reformatter import VideoReformatter

    with open_media(path, DEFAULT_DECODE_BUDGET_S) as container:
        if not container.streams.video:
            raise LoadError("no video stream")
        stream = container.streams.video[0]
        target = max(0.0, seconds) + media_origin(container)
        try:
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
            frame = next((f for f in container.decode(stream) if _at_or_after(f, target)), None)
        except (av.FFmpegError, ValueError, MemoryError) as e:
            raise LoadError(f"the video is damaged ({ffmpeg_reason(e)})") from None
        if frame is None:
            raise LoadError(f"no frame at {seconds:.1f} s")
        w, h = _display_size(frame, stream.sample_aspect_ratio)
        scale = min(1.0, side / max(w, h))
        return _shown(frame, VideoReformatter(), max(1, round(w * scale)), max(1, round(h * scale)))


def _at_or_after(frame, t: float) -> bool:
    return frame.time is None or frame.time >= t - 1e-3


def _shown(frame, reformatter, w: int, h: int):
    """The frame as a w x h RGB PIL image, turned by its rotation (w, h before turning)."""
    from PIL import Image

    img = reformatter.reformat(frame, w, h, "rgb24", interpolation="AREA").to_image()
    turn = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180,
            3: Image.Transpose.ROTATE_270}.get(_QUARTERS.get(frame.rotation % 360, 0))  # fmt: skip
    return img if turn is None else img.transpose(turn)


_QUARTERS = {90: 1, 180: 2, 270: 3}  # a frame's rotation (counter-clockwise) in quarter turns


def _display_size(frame, sar) -> tuple[int, int]:
    """Width and height of the picture as shown: stored pixels that are not square (an
    anamorphic DVD, say) are stretched to their aspect ratio."""
    w, h = frame.width, frame.height
    if sar and sar.numerator > 0 and sar.denominator > 0 and sar != 1:
        w = max(1, round(w * sar))
    return w, h
