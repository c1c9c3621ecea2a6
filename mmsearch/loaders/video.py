"""Video decoding: a video file -> its shots, each a start/end in seconds and one kept frame.

Frames are decoded in order (streamed: one decoded frame, the current shot's frame and two
thumbnails are held, whatever the video's length). Every `step_s` seconds a decoded frame is a
candidate: it is shrunk to a 32x18 thumbnail (cheap, in FFmpeg) and compared with the thumbnail
of the current shot's frame. A candidate that differs by more than `change` (mean absolute
difference, 0-1) starts a new shot, one that does not is merged into the shot. Two bounds make
the number of shots per minute predictable: a shot lasts at least 60 / max_per_minute s (a new
shot waits until then: a strobe costs at most max_per_minute frames a minute) and at most
60 / min_per_minute s (a static talk still gets a frame every 30 s, so every moment has a place
to be found at). The first frame of a shot is the one kept, turned the way the video is shown
(its rotation) and prepared for the image tower like a photo.

Damage is not fatal: a video that stops decoding halfway keeps the shots before the damage (and
says so in `VideoInfo.notes`); one that yields no frame at all raises LoadError with the reason.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LoadError
from .ffmpeg import (
    MAX_DURATION_S,
    check_video_header,
    ffmpeg_reason,
    header_duration,
    media_origin,
    open_media,
)
from .files import DEFAULT_DECODE_BUDGET_S, decode_budget

THUMB = (32, 18)  # width, height of the thumbnails compared (the aspect does not matter)
# Decoding may take this many seconds per second of video (plus the base budget) before the
# rest of the file is given up: 5x covers 4K HEVC on a slow CPU with room to spare.
DECODE_S_PER_S = 5.0


@dataclass(frozen=True)
class Sampling:
    """How frames are chosen (see the module docstring)."""

    min_per_minute: float = 2.0  # a shot lasts at most 60 / this seconds
    max_per_minute: float = 30.0  # a shot lasts at least 60 / this seconds
    step_s: float = 0.25  # a decoded frame is compared at most this often
    change: float = 0.15  # thumbnail difference (0-1) that starts a new shot

    def __post_init__(self):
        if not 0 < self.min_per_minute <= self.max_per_minute:
            raise ValueError("need 0 < min_per_minute <= max_per_minute")
        if self.step_s <= 0 or not 0 < self.change < 1:
            raise ValueError("need step_s > 0 and 0 < change < 1")

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

    duration: float = 0.0  # seconds of video decoded
    frames: int = 0  # frames decoded
    candidates: int = 0  # frames compared
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
    with open_media(path, time_budget_s) as container:
        if not container.streams.video:
            info.has_video = False
            return
        stream = container.streams.video[0]
        check_video_header(container, stream)
        # Frames nothing refers to are not decoded (B-frames of most encodes): the candidates
        # are a few per second, and skipping halves the decoding work where there are any.
        stream.codec_context.skip_frame = "NONREF"
        stream.thread_type = "AUTO"
        yield from _Sampler(container, stream, prep, sampling, info, time_budget_s).shots()


class _Sampler:
    def __init__(self, container, stream, prep, sampling, info, time_budget_s):
        from av.video.reformatter import VideoReformatter

        self.container, self.stream, self.prep = container, stream, prep
        self.sampling, self.info, self.budget = sampling, info, time_budget_s
        self.origin = media_origin(container)
        rate = stream.average_rate or stream.guessed_rate
        self.frame_s = float(1 / rate) if rate else 1 / 30
        self.header_s = header_duration(container, stream)
        self.reformatter = VideoReformatter()
        self.spent = 0.0  # seconds spent decoding (not while the caller holds a shot)
        self.end = 0.0  # where the last decoded frame ends

    def shots(self) -> Iterator[Shot]:
        s = self.sampling
        start = anchor = kept = None
        for t, frame in self._frames():
            thumb = self._thumb(frame)
            if anchor is not None:
                age = t - start
                if age < s.min_shot_s or (
                    age < s.max_shot_s and _difference(thumb, anchor) <= s.change
                ):
                    continue  # merged into the current shot
                yield Shot(start, t, kept)
            start, anchor = (0.0 if kept is None else t), thumb
            kept = self._keep(frame)
        end, told = self.end, self.header_s
        if not self.info.notes and told is not None and end < told <= end + 1:
            end = told  # the last frames were not decoded (NONREF) or are shorter
        elif not self.info.notes and told is not None and end < 0.9 * told - 1:
            self._stop(f"the frames end at {end:.1f} s but the header says {told:.1f} s")
        self.info.duration = end
        if kept is None:
            reason = self.info.notes.pop() if self.info.notes else "no frame could be decoded"
            raise LoadError(f"no video frames: {reason}")
        yield Shot(start, max(end, start), kept)

    def _frames(self) -> Iterator[tuple[float, Any]]:
        """(seconds, frame) of the candidates: a decoded frame at least step_s after the last
        one; stops (with a note) at damage, the decode budget or MAX_DURATION_S."""
        import av

        frames = self.container.decode(self.stream)
        last = next_at = -1.0
        while True:
            started = time.monotonic()
            try:
                with decode_budget(self.budget):
                    frame = next(frames, None)
            except LoadError as e:  # one step stalled
                self._stop(f"{e.reason} on one frame")
                return
            except (av.FFmpegError, ValueError, MemoryError) as e:
                self._stop(f"the video is damaged ({ffmpeg_reason(e)})")
                return
            self.spent += time.monotonic() - started
            if frame is None:
                return
            self.info.frames += 1
            t = _seconds(frame, self.info.frames, self.frame_s) - self.origin
            t = max(t, last, 0.0)  # damaged timestamps never run backwards
            last, self.end = t, t + self.frame_s
            if self._over_budget(t):
                return
            if t >= next_at:  # on a grid of step_s: on average one candidate per step
                next_at = (math.floor(t / self.sampling.step_s) + 1) * self.sampling.step_s
                self.info.candidates += 1
                yield t, frame

    def _over_budget(self, t: float) -> bool:
        if t > MAX_DURATION_S:
            self._stop(f"the video runs past {MAX_DURATION_S / 3600:g} h")
            return True
        if self.budget:
            known = self.header_s if self.header_s is not None else t
            allowed = self.budget + DECODE_S_PER_S * min(max(known, t), MAX_DURATION_S)
            if self.spent > allowed:
                self._stop(f"decoding took longer than {allowed:.0f} s")
                return True
        return False

    def _stop(self, why: str) -> None:
        t = self.end
        self.info.notes.append(f"{why}; the shots of the first {t:.1f} s are kept" if t else why)

    def _thumb(self, frame) -> np.ndarray:
        small = self.reformatter.reformat(
            frame, THUMB[0], THUMB[1], "rgb24", interpolation="AREA", threads=1
        )
        return small.to_ndarray().astype(np.int16)

    def _keep(self, frame):
        """The frame as shown (rotation applied), prepared for the image tower."""
        from PIL import Image

        from .image import resize_crop

        w, h = _display_size(frame, self.stream.sample_aspect_ratio)
        if self.prep is not None and self.prep.draft:
            # Shrunk by FFmpeg to twice the tower's input first (the exact resize is PIL's, as
            # for photos; the same bound as JPEG draft mode), which is what costs little at 4K.
            scale = min(1.0, 2 * min(self.prep.size) / min(w, h))
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
        img = self.reformatter.reformat(frame, w, h, "rgb24", interpolation="AREA").to_image()
        turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                270: Image.Transpose.ROTATE_270}.get(frame.rotation % 360)  # fmt: skip
        if turn is not None:
            img = img.transpose(turn)
        return img if self.prep is None else resize_crop(img, self.prep)


def _display_size(frame, sar) -> tuple[int, int]:
    """Width and height of the picture as shown: stored pixels that are not square (an
    anamorphic DVD, say) are stretched to their aspect ratio."""
    w, h = frame.width, frame.height
    if sar and sar.numerator > 0 and sar.denominator > 0 and sar != 1:
        w = max(1, round(w * sar))
    return w, h


def _seconds(frame, count: int, frame_s: float) -> float:
    t = frame.time
    return float(t) if t is not None else (count - 1) * frame_s


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean()) / 255.0
