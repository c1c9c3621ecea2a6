"""Where the video loader's candidate frames come from: keyframes first, more only where needed.

A first pass gives the decoder only the packets the demuxer flags as keyframes (and tells it to
skip anything else: skip_frame NONKEY). A keyframe needs no other frame decoded, so this pass
costs a few milliseconds per keyframe however long the video. Encoders put keyframes where it
matters: x264 and most others at scene cuts, phones every second or two. Between two
consecutive keyframes P and N (a group of pictures), the frames are decoded only where needed
(the second pass: a seek to P, then every frame others refer to, skip_frame NONREF, as the loader
always did):

- the group is longer than `Sampling.trust_gap_s` (a file with few keyframes, or one): a scene
  could come and go inside unseen;
- P and N differ by more than `Sampling.change` *and* a packet inside the group is cut-sized
  (2.5 times the group's median and a quarter of the smaller keyframe): the frame after
  a cut that is not a keyframe is coded almost from scratch, so its packet stands out. Without
  such a packet the difference is motion, a fade, or the cut is N itself: N is a candidate
  anyway. The last group (no keyframe closes it) is decoded where it holds a cut-sized packet
  or the data stops short of the header's duration (a truncated file).

Where a group was not decoded inside, a shot boundary is known to that group's precision only:
the shot starts at N's time (a frame actually decoded) though the cut may lie earlier in the
group. The demuxer's packet times (never decoded) tell where the video ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import LoadError
from .ffmpeg import MAX_DURATION_S, ffmpeg_reason, header_duration, media_origin
from .files import decode_budget

THUMB = (32, 18)  # width, height of the thumbnails compared (the aspect does not matter)
# Decoding may take this many seconds per second of video (plus the base budget) before the
# rest of the file is given up: 5x covers 4K HEVC on a slow CPU with room to spare.
DECODE_S_PER_S = 5.0
# A cut-sized packet: this many times the group's median (flat pictures, tiny packets) and this
# share of the smaller keyframe's packet (real footage: other frames are a few % of a keyframe).
CUT_PACKET_X_MEDIAN = 2.5
CUT_PACKET_X_KEY = 0.25


class FrameSource:
    """Candidates (seconds, frame, thumbnail, next_s) in time order: `next_s` is the time of the
    next candidate where it is known ahead (a keyframe whose group is not decoded inside; the
    video's end after the last), else None. `reopen()` gives a second (container, stream) of
    the same file for the second pass."""

    def __init__(self, container, stream, sampling, info, budget, reopen=None):
        from av.video.reformatter import VideoReformatter

        self.container, self.stream, self.sampling = container, stream, sampling
        self.info, self.budget, self.reopen = info, budget, reopen
        self.origin = media_origin(container)
        rate = stream.average_rate or stream.guessed_rate
        self.frame_s = float(1 / rate) if rate else 1 / 30
        self.header_s = header_duration(container, stream)
        self.reformatter = VideoReformatter()
        self.spent = 0.0  # seconds spent decoding (not while the caller holds a frame)
        self.end = 0.0  # where the last decoded frame (or, first pass, demuxed packet) ends
        self.exhausted = False  # the time budget is spent: nothing more is decoded
        self._second = None  # (container, stream) of the second pass, opened when needed
        self._packets: list[tuple[float, int]] = []  # (seconds, size) not yet in a group
        self._key_size: dict[int, int] = {}  # pts -> packet size of keyframes sent to decode
        # (seconds, thumbnail, next candidate's seconds) -> where the caller, holding back a
        # candidate that differs from the current shot still too short, could start a shot.
        self.held_until = lambda t, thumb, next_s: None

    def candidates(self) -> Iterator[tuple[float, Any, np.ndarray, float | None]]:
        if self.reopen is None:  # every frame others refer to, in one pass from the start
            self._second = (self.container, self.stream)
            yield from self._inside(-1.0, None)
            return
        held = None  # the last keyframe (t, frame, thumb, packet size), not yet given out
        for t, frame in self._decoded(self._keyframes()):
            key = (t, frame, self._thumb(frame), self._key_size.pop(frame.pts, None))
            group = self._group_sizes(t)
            if held is not None:
                yield from self._group(held, key, group)
            held = key
        if held is not None:
            yield from self._group(held, None, self._group_sizes(math.inf))
        elif not self.info.notes:  # no keyframe decoded (none flagged): decode it all
            yield from self._inside(-1.0, None)

    def _group(self, p, n, sizes: list[int]):
        """Keyframe p as a candidate, then the frames up to keyframe n (None: the end) where
        they are needed: the group is long or holds a cut; or p differs from the current shot
        but comes too soon to start a shot of its own, and n later than it could: then the
        frames up to the first that can (a short scene gets a frame from inside)."""
        end = n[0] if n is not None else self.end
        whole = self._needs_inside(p, n, sizes)
        until = None if whole else self.held_until(p[0], p[2], end)
        inside = whole or until is not None
        yield p[0], p[1], p[2], None if inside else max(end, p[0])
        if inside:
            yield from self._inside(p[0], end, until)

    def _needs_inside(self, p, n, sizes: list[int]) -> bool:
        """Whether the group from keyframe p to keyframe n (None: to the end) is decoded."""
        end = n[0] if n is not None else self.end
        if end - p[0] > self.sampling.trust_gap_s:
            return True
        if n is None and self.header_s is not None and end < 0.9 * self.header_s - 1:
            return True  # the data stops short of the header's end: nothing closes the group
        if n is not None and thumb_difference(p[2], n[2]) <= self.sampling.change:
            return False
        if not sizes:
            return False
        keys = [k[3] for k in (p, n) if k is not None and k[3]]
        bar = max(
            CUT_PACKET_X_MEDIAN * float(np.median(sizes)), CUT_PACKET_X_KEY * min(keys or [0])
        )
        return max(sizes) >= bar

    def _group_sizes(self, t: float) -> list[int]:
        """Sizes of the packets shown before `t` not yet in a group, but the first demuxed: the
        packet of the keyframe that opens the group."""
        before = [(s, n) for s, n in self._packets if s < t - 1e-6]
        self._packets = [(s, n) for s, n in self._packets if s >= t - 1e-6]
        return [n for _, n in before[1:]] if before else []

    def _keyframes(self) -> Iterator[Any]:
        """The first pass: demux everything, decode keyframes at most one per step_s."""
        stream, step = self.stream, self.sampling.step_s
        stream.codec_context.skip_frame = "NONKEY"
        # Frame threads would hold keyframes back and cost time on every skipped packet.
        stream.thread_type = "SLICE"
        num, den = stream.time_base.numerator, stream.time_base.denominator  # no Fractions:
        # they would cost more than the demuxing; int * int / int is rounded once, exactly
        next_at = last_key = check_at = -math.inf
        for packet in self.container.demux(stream):
            if packet.size and packet.pts is not None:
                t = packet.pts * num / den - self.origin
                self.end = max(self.end, t + ((packet.duration or 0) * num / den or self.frame_s))
                if t >= check_at:  # once a second of video: this loop runs for every packet
                    check_at = t + 1.0
                    if self._over_budget(t):  # demuxed on for days without a keyframe
                        return
                key = packet.is_keyframe
                if key:
                    last_key = max(last_key, t)
                if t - last_key <= self.sampling.trust_gap_s:  # else the group is decoded anyway
                    self._packets.append((t, packet.size))
                if not key or t < next_at:
                    continue
                next_at = t + step
                self._key_size[packet.pts] = packet.size
            elif packet.size:
                continue
            yield from packet.decode()  # an empty packet (the end) drains the decoder

    def _inside(self, t0: float, t1: float | None, until: float | None = None):
        """The second pass over (t0, t1) (t0 < 0: from the start, t1 None: to the end): every
        frame others refer to is decoded, one at most every step_s is a candidate; with
        `until`, up to the first candidate at or after it."""
        import av

        if self.exhausted:
            return
        if self._second is None:
            self._second = self.reopen()
            self._second[1].thread_type = "AUTO"  # before the decoder opens
        container, stream = self._second
        stream.codec_context.skip_frame = "NONREF"  # B-frames of most encodes: half the work
        if t0 >= 0:
            try:  # to the keyframe at or before t0: P itself
                container.seek(int((t0 + self.origin) / stream.time_base), stream=stream)
            except (av.FFmpegError, ValueError) as e:
                self.stop(f"the video cannot be searched ({ffmpeg_reason(e)})")
                return
        step = self.sampling.step_s
        next_at = (math.floor(t0 / step) + 1) * step
        reached = t1 if t1 is not None else self.end  # where the decoding inside ended
        try:
            for t, frame in self._decoded(container.decode(stream)):
                if t1 is not None and t >= t1 - 1e-6:
                    return
                if t > t0 and t >= next_at:  # on a grid of step_s: on average one per step
                    next_at = (math.floor(t / step) + 1) * step
                    yield t, frame, self._thumb(frame), None
                    if until is not None and t >= until:
                        reached = t
                        return
        finally:
            if t0 >= 0:
                self.info.spans.append((round(t0, 3), round(reached, 3)))

    def _decoded(self, frames) -> Iterator[tuple[float, Any]]:
        """(seconds, frame) of `frames`; stops (with a note) at damage, the decode budget or
        MAX_DURATION_S."""
        import av

        last = -1.0
        while True:
            started = time.monotonic()
            try:
                with decode_budget(self.budget):
                    frame = next(frames, None)
            except LoadError as e:  # one step stalled
                self.exhausted = True
                self.stop(f"{e.reason} on one frame")
                return
            except (av.FFmpegError, ValueError, MemoryError) as e:
                self.stop(f"the video is damaged ({ffmpeg_reason(e)})")
                return
            self.spent += time.monotonic() - started
            if frame is None:
                return
            self.info.frames += 1
            t = float(frame.time) - self.origin if frame.time is not None else last + self.frame_s
            t = max(t, last, 0.0)  # damaged timestamps never run backwards
            last, self.end = t, max(self.end, t + self.frame_s)
            if self._over_budget(t):
                return
            yield t, frame

    def _over_budget(self, t: float) -> bool:
        why = None
        if t > MAX_DURATION_S:
            why = f"the video runs past {MAX_DURATION_S / 3600:g} h"
        elif self.budget:
            known = self.header_s if self.header_s is not None else t
            allowed = self.budget + DECODE_S_PER_S * min(max(known, t), MAX_DURATION_S)
            if self.spent > allowed:
                why = f"decoding took longer than {allowed:.0f} s"
        if why is not None:
            self.stop(why)
            self.exhausted = True
        return why is not None

    def stop(self, why: str) -> None:
        """Note why decoding stopped (the first reason only: a second pass over damage that the
        first already met says nothing new)."""
        if self.info.notes:
            return
        t = self.end
        self.info.notes.append(f"{why}; the shots of the first {t:.1f} s are kept" if t else why)

    def _thumb(self, frame) -> np.ndarray:
        small = self.reformatter.reformat(
            frame, THUMB[0], THUMB[1], "rgb24", interpolation="AREA", threads=1
        )
        return small.to_ndarray().astype(np.int16)


def thumb_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean()) / 255.0
