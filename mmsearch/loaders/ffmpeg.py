"""Opening media files through PyAV (FFmpeg's libraries in a wheel), for the video loader, the
audio loader's fallback (m4a, aac, opus, webm) and the clip cutter.

The demuxer is chosen from the file's extension, never probed: FFmpeg's probe also accepts
playlists and concat lists, which open other files, and a file named .mp4 must be an MP4. Any
FFmpeg error becomes a LoadError with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..errors import LoadError
from .files import decode_budget, open_for_decoding

# Extension -> FFmpeg demuxer (MP4, MOV, M4V, M4A and 3GP are one format, as are MKV and WebM).
DEMUXERS = {
    ".mp4": "mov",
    ".mov": "mov",
    ".m4v": "mov",
    ".m4a": "mov",
    ".3gp": "mov",
    ".mkv": "matroska",
    ".webm": "matroska",
    ".avi": "avi",
    ".aac": "aac",
    ".opus": "ogg",
    ".ogg": "ogg",
    ".oga": "ogg",
    ".mp3": "mp3",
    ".wav": "wav",
    ".flac": "flac",
}

# Refused from the header, before any frame is decoded: a frame this large, or a stream this
# long, is not something a phone or camera wrote (8K is 33 Mpx; two days of 120 fps is 20.7 M
# frames). FFmpeg is also told the pixel limit, so a frame that grows mid-stream is refused too.
MAX_FRAME_PIXELS = 8192 * 8192
MAX_DURATION_S = 48 * 3600.0
MAX_FRAMES = int(MAX_DURATION_S * 120)


def demuxer_for(path: bytes | str | os.PathLike) -> str:
    ext = os.path.splitext(os.fsdecode(path))[1].lower()
    try:
        return DEMUXERS[ext]
    except KeyError:
        raise LoadError(f"no demuxer for {ext or 'files without an extension'}") from None


def ffmpeg_reason(e: BaseException) -> str:
    """An FFmpeg error as a short lower-case reason (PyAV's message names the file, known here)."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text[:1].lower() + text[1:].rstrip(".")


def _refuse_nested(url, flags, options):
    # Demuxers that open other files (dref atoms, playlists) get nothing.
    raise PermissionError(f"{url}: opening other files is not allowed")


@contextmanager
def open_media(path: bytes | str | os.PathLike, budget_s: float | None) -> Iterator:
    """The PyAV input container of `path`, opened with the demuxer its extension names; reading
    the header may take at most `budget_s` (see loaders.decode_budget). Raises LoadError with a
    reason for a file that is empty, not a regular file, or not of its extension's format."""
    import av

    fmt = demuxer_for(path)
    with open_for_decoding(path) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise LoadError("empty file (0 bytes)")
        try:
            with decode_budget(budget_s):
                container = av.open(f, format=fmt, io_open=_refuse_nested)
        except (av.FFmpegError, ValueError, OSError) as e:
            raise LoadError(f"not a readable {_format_name(path)} file: {ffmpeg_reason(e)}") from e
        try:
            yield container
        finally:
            container.close()


def _format_name(path) -> str:
    return os.path.splitext(os.fsdecode(path))[1].lstrip(".").upper() or "media"


def media_origin(container) -> float:
    """Seconds of the container's first timestamp: times here count from it, as players do."""
    start = container.start_time
    return start / 1_000_000 if start is not None else 0.0


def header_duration(container, stream=None) -> float | None:
    """The duration the header gives (the stream's, else the container's), or None."""
    if stream is not None and stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000
    return None


def check_video_header(container, stream) -> None:
    """Refuse a video stream whose header claims an absurd frame size or length."""
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > MAX_FRAME_PIXELS:
        raise LoadError(f"video frame too large: {w}x{h} pixels (limit {MAX_FRAME_PIXELS})")
    duration = header_duration(container, stream)
    if stream.frames > MAX_FRAMES or (duration or 0) > MAX_DURATION_S:
        raise LoadError(
            f"video too long: its header says {stream.frames} frames, "
            f"{(duration or 0) / 3600:.1f} h (limit {MAX_DURATION_S / 3600:g} h)"
        )
    # FFmpeg's own check, for frames whose size changes mid-stream.
    stream.codec_context.options = {"max_pixels": str(MAX_FRAME_PIXELS)}


class NoAudioStream(LoadError):
    """The file has no audio stream (a silent video)."""


class AudioReader:
    """A soundfile.SoundFile look-alike over the first audio stream of a PyAV container:
    `samplerate`, `channels`, `frames` (from the header, None when it gives no duration) and
    `read(n, dtype="float32", always_2d=True)` returning up to n (n, channels) float32 frames,
    an empty array at the end. Streams what it reads: no more than one decoded frame is kept
    beyond what was asked for. A damaged packet raises ValueError (as soundfile does)."""

    def __init__(self, container):
        import av

        streams = container.streams.audio
        if not streams:
            raise NoAudioStream("no audio stream")
        self._stream = stream = streams[0]
        ctx = stream.codec_context
        self.samplerate = int(ctx.sample_rate or 0)
        self.channels = int(ctx.channels or 0)
        duration = header_duration(container, stream)
        self.frames = None if duration is None else int(round(duration * self.samplerate))
        if self.samplerate <= 0 or self.channels <= 0:
            raise LoadError(
                f"no readable audio: the stream's header says {self.samplerate} Hz, "
                f"{self.channels} channel(s)"
            )
        # Packed float32 at the stream's own rate and layout (a layout or rate that changes
        # mid-stream is converted to the first one): downmixing and resampling are the caller's.
        self._resampler = av.AudioResampler(
            format="flt", layout=ctx.layout.name, rate=self.samplerate
        )
        self._frames = container.decode(stream)
        self._pending = np.zeros((0, self.channels), np.float32)
        self._done = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def read(self, n: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        parts, have = [self._pending], len(self._pending)
        while have < n and not self._done:
            block = self._next_block()
            if block is None:
                self._done = True
            else:
                parts.append(block)
                have += len(block)
        data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self._pending = data[n:]
        return data[:n]

    def _next_block(self) -> np.ndarray | None:
        import av

        try:
            frame = next(self._frames, None)
        except av.FFmpegError as e:
            raise ValueError(ffmpeg_reason(e)) from e
        frames = self._resampler.resample(frame)  # None flushes the resampler
        if not frames:
            return None if frame is None else np.zeros((0, self.channels), np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1, self.channels) for f in frames])
