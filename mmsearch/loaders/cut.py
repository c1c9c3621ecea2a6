"""Cutting a moment out of a video or recording into a file of its own (`mmsearch clip`).

Packets are copied as they are (no quality lost, nothing decoded) when the output format can
hold the source's codecs and the source has a keyframe at most KEYFRAME_SLACK_S before the
moment: a copy starts at that keyframe, and may end a few frames after the moment (frames
shown before the end can refer to one shown after it; at 30 fps that is about 0.1 s).
Otherwise the moment is decoded and re-encoded, from and to where asked. The output is written beside its final name and renamed into place, so a
failed cut leaves no half-written file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from ..errors import LoadError, UsageError
from ..storage.atomic import replace_file
from .ffmpeg import ffmpeg_reason, header_duration, media_origin, open_media
from .files import DEFAULT_DECODE_BUDGET_S

KEYFRAME_SLACK_S = 1.0
_FINE = Fraction(1, 90000)  # time base of re-encoded video (MPEG's clock)


@dataclass(frozen=True)
class Output:
    muxer: str  # FFmpeg's name
    video: str | None  # encoder when re-encoding; None: the format holds sound only
    audio: str
    # Source codecs copied as they are (name prefixes); None: whatever the muxer accepts.
    copies: tuple[str, ...] | None = None


OUTPUTS = {
    ".mp4": Output("mp4", "libx264", "aac"),
    ".m4v": Output("mp4", "libx264", "aac"),
    ".mov": Output("mov", "libx264", "aac"),
    ".3gp": Output("3gp", "libx264", "aac"),
    ".mkv": Output("matroska", "libx264", "aac"),
    ".webm": Output("webm", "libvpx-vp9", "libopus"),
    ".avi": Output("avi", "mpeg4", "libmp3lame"),
    ".m4a": Output("ipod", None, "aac", ("aac", "alac")),
    ".mp3": Output("mp3", None, "libmp3lame", ("mp3",)),
    ".ogg": Output("ogg", None, "libopus", ("opus", "vorbis", "flac")),
    ".opus": Output("opus", None, "libopus", ("opus",)),
    ".flac": Output("flac", None, "flac", ("flac",)),
    ".wav": Output("wav", None, "pcm_s16le", ("pcm_",)),
}


@dataclass(frozen=True)
class Cut:
    """What was written: the seconds of the source the clip covers, and how."""

    start: float
    end: float
    copied: bool  # packets copied as they are; False: decoded and re-encoded


def cut_clip(
    source: str | os.PathLike,
    start: float,
    end: float,
    out: str | os.PathLike,
    copy: bool | None = None,
) -> Cut:
    """Write seconds `start`..`end` of `source` to `out` (its format from its extension).
    `copy`: True copies packets or fails, False always re-encodes, None (the default) copies
    where possible. Raises UsageError for a bad range or output, LoadError for a source that
    cannot be read."""
    out = Path(out)
    kind = _output(out)
    if not 0 <= start < end:
        raise UsageError(f"need 0 <= start < end, got start={start:g}, end={end:g}")
    if out.exists() and os.path.samefile(out, source):
        raise UsageError(f"{out} is the source itself; choose another output file")
    with open_media(source, DEFAULT_DECODE_BUDGET_S) as src:
        pictures = list(src.streams.video[:1]) if kind.video else []  # .wav: the sound only
        streams = pictures + list(src.streams.audio[:1])
        if not streams:
            raise LoadError(f"no {'video or ' if kind.video else ''}audio stream to cut")
        duration = header_duration(src)
        if duration is not None and start >= duration:
            raise UsageError(f"start={start:g} s is past the end ({duration:.1f} s)")
        end = min(end, duration) if duration is not None else end
        origin = media_origin(src)
        if copy is not False:
            keyframe, why = _copy_start(src, streams, start, origin, kind)
            if keyframe is not None:
                try:
                    return _write(
                        out, lambda f: _copy(src, streams, keyframe, end, origin, f, kind)
                    )
                except _CannotCopy as e:
                    why = str(e)
            if copy is True:
                raise UsageError(f"cannot copy the streams into {out.suffix}: {why}")
        return _write(out, lambda f: _encode(src, streams, start, end, origin, f, kind))


def _output(out: Path) -> Output:
    try:
        return OUTPUTS[out.suffix.lower()]
    except KeyError:
        raise UsageError(
            f"cannot write {out.suffix or 'files without an extension'} clips; use one of "
            + ", ".join(sorted(OUTPUTS))
        ) from None


class _CannotCopy(Exception):
    pass


def _copy_start(src, streams, start: float, origin: float, kind: Output):
    """(the keyframe a copy starts at, None), or (None, why the moment cannot be copied)."""
    for s in streams:
        name = s.codec_context.name
        if kind.copies is not None and not name.startswith(kind.copies):
            return None, f"{kind.muxer} does not hold {name}"
    keyframe = _keyframe_before(src, streams[0], start, origin)
    if keyframe is None:
        return None, "no keyframe before the start"
    if start - keyframe > KEYFRAME_SLACK_S:
        return None, f"the keyframe before the start is {start - keyframe:.1f} s earlier"
    return keyframe, None


def _write(out: Path, write) -> Cut:
    box: list[Cut] = []
    replace_file(out, lambda f: box.append(write(f)), index=False)
    return box[0]


def _keyframe_before(src, stream, start: float, origin: float) -> float | None:
    """Seconds of the last keyframe of `stream` at or before `start` (None when there is none)."""
    for packet in _packets(src, [stream], start, float("inf"), origin):
        t = float(packet.pts * stream.time_base) - origin
        return max(t, 0.0) if packet.is_keyframe and t <= start + 1e-6 else None
    return None


def _seek(src, stream, t: float, origin: float) -> None:
    import av

    try:
        src.seek(int((t + origin) / stream.time_base), stream=stream, backward=True)
    except av.FFmpegError:
        src.seek(0)


def _packets(src, streams, start: float, end: float, origin: float):
    """The packets of `streams` from the keyframe at or before `start`, in decode order, until
    each stream has one decoded at or after `end` (a frame shown before `end` may refer to a
    later one: it is kept)."""
    import av

    _seek(src, streams[0], start, origin)
    live = {s.index for s in streams}
    try:
        for packet in src.demux(streams):
            i = packet.stream.index
            if packet.pts is None or i not in live:
                continue  # the demuxer's empty packet at the end
            decoded = packet.dts if packet.dts is not None else packet.pts
            if float(decoded * packet.stream.time_base) - origin >= end:
                live.discard(i)
                if not live:
                    return
                continue
            yield packet
    except av.FFmpegError as e:
        raise LoadError(f"the source is damaged ({ffmpeg_reason(e)})") from None


def _copy(src, streams, keyframe: float, end: float, origin: float, f, kind: Output) -> Cut:
    """The packets from the keyframe at `keyframe` up to `end`, timestamps moved to start at 0."""
    import av

    last = keyframe
    try:
        with av.open(f, "w", format=kind.muxer) as dst:
            outs = {s.index: dst.add_stream_from_template(s) for s in streams}
            for packet in _packets(src, streams, keyframe, end, origin):
                tb = packet.stream.time_base
                t = float(packet.pts * tb) - origin
                if t < keyframe - 1e-6:
                    continue  # B-frames of the group before the keyframe: they need its frames
                last = max(last, t + float((packet.duration or 0) * tb))
                shift = round((keyframe + origin) / tb)
                packet.pts -= shift
                if packet.dts is not None:
                    packet.dts -= shift
                packet.stream = outs[packet.stream.index]
                dst.mux(packet)
    except (av.FFmpegError, ValueError) as e:
        raise _CannotCopy(ffmpeg_reason(e)) from None
    if last <= keyframe:
        raise _CannotCopy("no packets between start and end")
    return Cut(keyframe, last, copied=True)


def _encode(src, streams, start: float, end: float, origin: float, f, kind: Output) -> Cut:
    """Decode from the keyframe before `start`; encode what is shown from `start` to `end`."""
    import av

    first, last = end, start
    turn = _rotation(src, streams[0]) if streams[0].type == "video" else 0
    with av.open(f, "w", format=kind.muxer) as dst:
        outs = {s.index: _new_stream(dst, s, kind, turn) for s in streams}
        try:
            for index, frame in _decoded(src, streams, start, end, origin):
                piece = _trim(frame, start, end, origin)
                if piece is not None:
                    frame, t, t_end = piece
                    first, last = min(first, t), max(last, t_end)
                    dst.mux(outs[index].encode(_for_encoder(frame, outs[index], t - start)))
            for o in outs.values():
                dst.mux(o.encode(None))
        except av.FFmpegError as e:
            raise LoadError(f"cannot re-encode the source: {ffmpeg_reason(e)}") from None
    if last <= first:
        raise UsageError("nothing to cut between start and end")
    return Cut(first, last, copied=False)


def _decoded(src, streams, start: float, end: float, origin: float):
    """(stream index, frame) decoded from the keyframe before `start` until past `end`, the
    frames each decoder still holds included."""
    for packet in _packets(src, streams, start, end, origin):
        for frame in packet.decode():
            yield packet.stream.index, frame
    for s in streams:
        for frame in s.codec_context.decode(None):
            frame.time_base = frame.time_base or s.time_base
            yield s.index, frame


def _rotation(src, stream) -> int:
    """The display rotation of a video stream (the first frame's): re-encoded frames keep it."""
    import av

    _seek(src, stream, 0.0, media_origin(src))
    try:
        for frame in src.decode(stream):
            return frame.rotation
    except av.FFmpegError:
        pass
    return 0


def _new_stream(dst, s, kind: Output, turn: int = 0):
    import av

    ctx = s.codec_context
    if s.type == "video":
        o = dst.add_stream(kind.video, rate=s.average_rate or s.guessed_rate or 30)
        o.width, o.height = ctx.width - ctx.width % 2, ctx.height - ctx.height % 2
        o.pix_fmt = "yuv420p"
        o.time_base = o.codec_context.time_base = _FINE
        if turn:
            o.set_display_rotation(turn)
        return o
    rates = av.Codec(kind.audio, "w").audio_rates
    o = dst.add_stream(kind.audio, rate=ctx.sample_rate if not rates or ctx.sample_rate in rates
                       else 48000)  # fmt: skip
    o.layout = "mono" if ctx.channels == 1 else "stereo"
    return o


def _trim(frame, start: float, end: float, origin: float):
    """(frame, start s, end s) of the part of a decoded frame between `start` and `end`, or
    None when none of it is. Video frames are kept whole; audio is cut to the sample."""
    import av

    if frame.time is None:
        return None
    t = float(frame.time) - origin
    if isinstance(frame, av.VideoFrame):
        shown = t + float((frame.duration or 0) * frame.time_base)
        return (frame, t, shown) if start <= t < end else None
    rate, n = frame.sample_rate, frame.samples
    a, b = max(0, round((start - t) * rate)), min(n, round((end - t) * rate))
    if b <= a:
        return None
    if (a, b) != (0, n):
        data = frame.to_ndarray()
        k = 1 if frame.format.is_planar else len(frame.layout.channels)
        piece = av.AudioFrame.from_ndarray(
            data[:, a * k : b * k], format=frame.format.name, layout=frame.layout.name
        )
        piece.sample_rate = rate
        frame = piece
    return frame, t + a / rate, t + b / rate


def _for_encoder(frame, o, t: float):
    """The frame at second `t` of the output, in the encoder's picture format."""
    from av import VideoFrame

    if isinstance(frame, VideoFrame):
        if (frame.width, frame.height, frame.format.name) != (o.width, o.height, "yuv420p"):
            frame = frame.reformat(o.width, o.height, "yuv420p")
        frame.time_base = _FINE
    else:
        frame.time_base = Fraction(1, frame.sample_rate)
    frame.pts = round(t / frame.time_base)
    return frame
