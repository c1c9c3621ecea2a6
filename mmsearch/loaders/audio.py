"""Audio decoding: any file libsndfile reads (else PyAV: m4a, aac, a video's soundtrack) -> mono
float32 windows at the audio tower's rate.

Deterministic by construction: the file is read in fixed-size blocks, downmixed to mono (channel
mean), resampled with a streaming soxr resampler, and cut into fixed windows. A file no longer than
one window is one window of its true length (the tower repeat-pads it the way CLAP does); a longer
file gets windows every `hop_s` seconds plus one window aligned to its end (unless the end lies
within TAIL_SLACK_S of the last window), so every window of a long file is full length. Nothing here holds more than about one window and one block of audio
besides the windows it returns, so hours-long files stream (see `iter_windows`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from ..config import AudioWindowing
from ..errors import LoadError
from ..modalities import AUDIO, BY_NAME
from .ffmpeg import DEMUXERS, AudioReader, open_media
from .files import DEFAULT_DECODE_BUDGET_S, decode_budget, open_for_decoding

AUDIO_TABLE = BY_NAME[AUDIO]
PYAV_ONLY = frozenset({".m4a", ".aac"})  # libsndfile reads none of these

# What libsndfile 1.2 decodes (wav/aiff/flac/ogg-vorbis/ogg-opus/mp3 and friends), and what
# PyAV decodes when libsndfile cannot (m4a/aac; a damaged ogg or mp3 libsndfile refuses).
AUDIO_EXTENSIONS = AUDIO_TABLE.extensions

DEFAULT_WINDOWING = AudioWindowing()  # CLAP's: 10 s windows at 48 kHz every 7.5 s
DEFAULT_WINDOW_S, DEFAULT_HOP_S = DEFAULT_WINDOWING.window_s, DEFAULT_WINDOWING.hop_s
MIN_SECONDS = 0.01  # shorter than this is not a sound anyone searches for
TAIL_SLACK_S = 0.1  # an end this short past the last full window gets no window of its own
BLOCK_FRAMES = 1 << 16  # frames read per block at the file's own rate


@dataclass(frozen=True)
class AudioWindows:
    """A decoded file: windows of mono float32 audio at `sample_rate`.

    `duration` is the length of the decoded audio in seconds (the whole file, unless `truncated`).
    `notes` says what was done to the audio that a user may want to know (resampling, downmixing,
    cutting at max_seconds); failures are never notes, they raise LoadError.
    """

    sample_rate: int
    duration: float
    windows: list[tuple[float, float, np.ndarray]]  # (start_s, end_s, samples)
    truncated: bool = False
    notes: tuple[str, ...] = ()


def load_audio(
    path: str | os.PathLike | bytes,
    windowing: AudioWindowing = DEFAULT_WINDOWING,
    max_seconds: float | None = None,
) -> AudioWindows:
    """Decode `path` into windows. Raises LoadError with a reason for audio that cannot be used.

    `max_seconds` stops decoding after that much audio (the result says `truncated`); without it a
    long file yields all its windows, about 1.3 x 192 kB per second of audio at 48 kHz.
    """
    info = _StreamInfo()
    windows = list(iter_windows(path, windowing, max_seconds, info=info))
    return AudioWindows(
        sample_rate=windowing.sample_rate,
        duration=info.duration,
        windows=windows,
        truncated=info.truncated,
        notes=tuple(info.notes),
    )


class _StreamInfo:
    """Filled in by `iter_windows` as it runs; complete once the iterator is exhausted."""

    def __init__(self) -> None:
        self.duration = 0.0
        self.truncated = False
        self.notes: list[str] = []


def iter_windows(
    path: str | os.PathLike | bytes,
    windowing: AudioWindowing = DEFAULT_WINDOWING,
    max_seconds: float | None = None,
    info: _StreamInfo | None = None,
    time_budget_s: float | None = DEFAULT_DECODE_BUDGET_S,
    soundtrack: bool = False,
) -> Iterator[tuple[float, float, np.ndarray]]:
    """Yield (start_s, end_s, samples) windows while decoding, holding at most a window and a
    block in memory. A LoadError can come after some windows were yielded (a file that turns out
    damaged halfway): treat it as a failure of the whole file.

    libsndfile decodes what it can; PyAV decodes the rest (m4a, aac, and with `soundtrack` the
    first audio stream of a video; ffmpeg.NoAudioStream when there is none).

    A path that is not a regular file is refused without blocking. Opening the file and reading
    each block may take at most `time_budget_s` (in a process's main thread; see
    loaders.decode_budget): a file that stalls the decoder fails instead of stalling the run.
    Hours-long files are not limited: the budget is per block, not per file."""
    sample_rate, window_s, hop_s = windowing.sample_rate, windowing.window_s, windowing.hop_s
    if window_s <= 0 or hop_s <= 0 or hop_s > window_s:
        raise ValueError(f"need 0 < hop_s <= window_s, got window_s={window_s}, hop_s={hop_s}")
    info = info if info is not None else _StreamInfo()
    cut = (sample_rate, int(round(window_s * sample_rate)), int(round(hop_s * sample_rate)))
    ext = os.path.splitext(os.fsdecode(path))[1].lower()
    refused = None
    if not soundtrack and ext not in PYAV_ONLY:
        try:
            f = _open_sndfile(path, time_budget_s)
        except LoadError as e:
            if ext not in DEMUXERS:
                raise
            refused = e  # PyAV may read it (a file libsndfile finds damaged, say)
        else:
            yield from _windows(f, info, *cut, max_seconds, time_budget_s)
            return
    with ExitStack() as stack:
        try:
            container = stack.enter_context(open_media(path, time_budget_s))
            reader = AudioReader(container)
        except LoadError as e:
            raise (refused or e) from None
        yield from _windows(reader, info, *cut, max_seconds, time_budget_s)


def _open_sndfile(path, time_budget_s):
    """The file opened by libsndfile. Opened here first: a path that became a FIFO or a device
    must not block, and libsndfile's own open calls unreadable junk "File does not exist"."""
    with open_for_decoding(path) as raw:
        if os.fstat(raw.fileno()).st_size == 0:
            raise LoadError("empty file (0 bytes)")
        try:
            with decode_budget(time_budget_s):
                # libsndfile reads through its own descriptor, a duplicate of this one
                return sf.SoundFile(os.dup(raw.fileno()), closefd=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as e:
            raise LoadError(f"not a readable audio file: {_sf_reason(e)}") from e


def _windows(f, info, sample_rate, win, hop, max_seconds, time_budget_s):
    with f:
        rate, _ = _stream_format(f, info, sample_rate)
        limit = None if max_seconds is None else int(math.ceil(max_seconds * rate))
        resampler = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")

        buf = np.zeros(0, dtype=np.float32)
        buf_start = 0  # absolute index (at sample_rate) of buf[0]
        next_start = 0  # start of the next full window to emit
        decoded = 0  # frames read at the file's rate
        emitted_end = 0  # end of the last emitted window
        done = False
        while not done:
            want = BLOCK_FRAMES if limit is None else min(BLOCK_FRAMES, limit - decoded)
            mono = _read_mono(f, want, decoded, time_budget_s) if want > 0 else None
            done = mono is None
            if done:
                if limit is not None and decoded >= limit and (f.frames or limit + 1) > decoded:
                    info.truncated = True
                    total = f" of {f.frames / rate:.0f} s" if f.frames else ""
                    info.notes.append(
                        f"only the first {decoded / rate:g} s{total} were decoded "
                        f"(max_seconds={max_seconds:g})"
                    )
                mono = np.zeros(0, dtype=np.float32)
            else:
                decoded += len(mono)
            out = resampler.resample_chunk(np.ascontiguousarray(mono), last=done)
            if len(out):
                buf = np.concatenate([buf, out]) if len(buf) else out
            # Full windows that are complete now.
            while next_start + win <= buf_start + len(buf):
                a = next_start - buf_start
                if next_start + win < buf_start + len(buf) or done:
                    yield _window(next_start, win, buf[a : a + win], sample_rate)
                    emitted_end = next_start + win
                    next_start += hop
                else:
                    break  # exactly at the end: wait to know whether the file ends here
            # Keep what a later window or the end-aligned last window may still need.
            keep_from = min(next_start, buf_start + len(buf) - win)
            if keep_from > buf_start:
                buf = buf[keep_from - buf_start :].copy()
                buf_start = keep_from

        total = buf_start + len(buf)  # samples at sample_rate
        info.duration = total / sample_rate
        if decoded / rate < MIN_SECONDS or total < 2:
            raise LoadError(
                f"too short to embed: {decoded} sample{'s' if decoded != 1 else ''} "
                f"({decoded / rate * 1000:.3g} ms); at least {MIN_SECONDS * 1000:g} ms is needed"
            )
        if emitted_end == 0:
            yield _window(0, total, buf[:total], sample_rate)  # one short window: the whole file
        elif total - emitted_end > TAIL_SLACK_S * sample_rate:
            yield _window(total - win, win, buf[len(buf) - win :], sample_rate)


def _stream_format(f, info, sample_rate: int) -> tuple[int, int]:
    """(rate, channels) of an opened stream, refused when unusable; what will be done to it is
    noted in `info`."""
    rate, channels = int(f.samplerate), int(f.channels)
    if rate <= 0 or channels <= 0:
        raise LoadError(f"bad audio header: {rate} Hz, {channels} channel(s)")
    if f.frames == 0:  # None: the header does not say (PyAV)
        raise LoadError("no audio samples (zero-length)")
    if channels > 1:
        info.notes.append(f"downmixed {channels} channels to mono")
    if rate != sample_rate:
        info.notes.append(f"resampled {rate} Hz to {sample_rate} Hz")
    return rate, channels


def _read_mono(f, want: int, decoded: int, time_budget_s) -> np.ndarray | None:
    """The next block of at most `want` frames as mono float32, or None at the end. `decoded`
    (frames before it) dates the damage a LoadError reports."""
    rate = int(f.samplerate)
    try:
        with decode_budget(time_budget_s):  # per block: never armed across a yield
            block = f.read(want, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise LoadError(
            f"audio data is damaged ({_sf_reason(e)}); "
            f"{decoded / rate:.1f} s decoded before the damage"
        ) from e
    if block is None or len(block) == 0:
        return None
    if not np.isfinite(block).all():
        bad = int(np.argmax(~np.isfinite(block).all(axis=1)))
        raise LoadError(
            f"NaN or infinite samples (first at {(decoded + bad) / rate:.3f} s): "
            "the file is damaged"
        )
    return block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)


def _window(start: int, length: int, samples: np.ndarray, rate: int):
    return (start / rate, (start + length) / rate, np.array(samples, dtype=np.float32, copy=True))


# libsndfile says this when its format probe gives up on a file it opened itself (random bytes
# named .mp3); the file exists and is regular, since it was opened here first.
_MISLEADING = ("File does not exist or is not a regular file",)


def _sf_reason(e: Exception) -> str:
    text = str(e).strip()
    # libsndfile messages start with "Error opening '<path>': "; the path is already known.
    if ": " in text and text.startswith("Error opening"):
        text = text.split(": ", 1)[1]
    if text.startswith(_MISLEADING):
        return "format not recognised"
    text = text.rstrip(".")
    return (text[:1].lower() + text[1:]) if text else type(e).__name__
