"""Loaders turn one file into model input. This module maps extensions to modalities and holds the
worker entry point; it imports nothing heavy so worker processes start fast."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..config import DEFAULT_MAX_NOTE_BYTES
from ..errors import LoadError
from ..modalities import BY_EXTENSION, IMAGE, TEXT
from ..records import FileEntry

DEFAULT_DECODE_BUDGET_S = 60.0
HASH_BLOCK = 1 << 20  # bytes read at a time when hashing
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # absent on Windows, which has no FIFOs to open
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)


def modality_of(name: bytes | str) -> str | None:
    """The modality a file name's extension says (see `modalities.TABLE`), or None."""
    ext = os.path.splitext(os.fsdecode(name))[1].lower()
    return BY_EXTENSION.get(ext)


@dataclass(frozen=True)
class LoadSettings:
    """What workers need to know to turn files into model input (picklable)."""

    image_prep: Any = None  # config.ImagePrep
    audio: Any = None  # audio loader settings (sample rate, window), or None when no audio tower
    modalities: frozenset = frozenset({IMAGE, TEXT})
    max_note_bytes: int = DEFAULT_MAX_NOTE_BYTES  # what a note contributes; the rest is a warning
    # Seconds one file's decoding may take before it is recorded as a failure; None: no limit.
    # Enforced with SIGALRM, so only where load_file runs in a process's main thread (decode
    # workers, the in-process path); elsewhere (threads) decoding is not timed.
    decode_budget_s: float | None = DEFAULT_DECODE_BUDGET_S


@dataclass
class Loaded:
    entry: FileEntry
    hash: str | None
    payload: Any = None  # image: uint8 array; text: str; audio: windows
    error: str | None = None
    # Something the user should know about a file that was loaded (e.g. a note cut at
    # max_note_bytes): the file is indexed; for the indexer to report beside the failures.
    warning: str | None = None


class NotRegularFileError(OSError):
    """The path names a FIFO, device, socket or directory: reading it could block or never end.
    An OSError, so callers that treat unreadable files alike need nothing new."""

    def __init__(self, kind: str):
        super().__init__(errno.EINVAL, f"not a regular file ({kind})")
        self.reason = self.strerror


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def open_regular(path: bytes | str | os.PathLike) -> BinaryIO:
    """Open `path` for reading only if it is a regular file, without ever blocking in open().

    The path may have been replaced since it was listed: opening a FIFO blocks until a writer
    comes, reading a device may never end. So the file is opened non-blocking, its type is
    checked on the open descriptor (no race with a rename), and only then is blocking restored.
    Raises NotRegularFileError (an OSError) for anything else, OSError when it cannot be opened.
    """
    flags = os.O_RDONLY | _O_NONBLOCK | _O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR, errno.EOPNOTSUPP):  # sockets, directories
            try:
                st = os.stat(path)
            except OSError:
                raise e from None
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFileError(_kind(st.st_mode)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(_kind(st.st_mode))
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_for_decoding(path: bytes | str | os.PathLike) -> BinaryIO:
    """`open_regular` for a decoder: a path that cannot be used raises LoadError with the reason
    (not a regular file, or why it cannot be read)."""
    try:
        return open_regular(path)
    except NotRegularFileError as e:
        raise LoadError(e.reason) from None
    except OSError as e:
        raise LoadError(f"cannot read file: {e.strerror or e}") from None


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_open_file(f: BinaryIO) -> str:
    """blake2b-16 of the whole file behind `f`, read in bounded blocks with pread, so the file
    position (and whatever is decoding from `f`) is left as it was. Equal to content_hash of
    the file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    if not hasattr(os, "pread"):  # Windows: read through the file object, then put it back
        position = f.tell()
        f.seek(0)
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
        f.seek(position)
        return h.hexdigest()
    fd, offset = f.fileno(), 0
    while True:
        block = os.pread(fd, HASH_BLOCK, offset)
        if not block:
            return h.hexdigest()
        h.update(block)
        offset += len(block)


def file_hash(path: bytes) -> str:
    """Content hash of a regular file; raises OSError (NotRegularFileError for FIFOs and other
    special files) instead of blocking."""
    with open_regular(path) as f:
        return hash_open_file(f)


class DecodeTimeout(LoadError):
    """Decoding one file took longer than its budget."""


@contextmanager
def decode_budget(seconds: float | None) -> Iterator[None]:
    """Raise DecodeTimeout ("decoding took longer than N s") inside the block after `seconds`.

    Uses SIGALRM, so it only acts in the main thread of a process (elsewhere the block runs
    untimed). An interval timer already running (a test runner's timeout, say) is left alone
    when it fires first, and re-armed with its remaining time afterwards. The signal handler
    runs between Python bytecodes, so a decoder stuck inside one C call is stopped when that
    call returns; decoders here work in bounded blocks, which keeps that short.
    """
    if (
        not seconds
        or seconds <= 0
        or not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer_delay and outer_delay <= seconds:
        yield  # someone else's alarm comes first; theirs to handle
        return
    armed = True

    def on_alarm(signum, frame):
        if armed:
            raise DecodeTimeout(f"decoding took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            left = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)


def _load_image(f: BinaryIO, settings: LoadSettings) -> tuple[str, Any, str | None]:
    from .image import decode_image, open_image

    with open_image(f) as img:  # the header only: a non-image is refused before reading more
        digest = hash_open_file(f)
        return digest, decode_image(img, settings.image_prep), None


def _load_note(f: BinaryIO, settings: LoadSettings) -> tuple[str, Any, str | None]:
    from .text import read_note

    note = read_note(f, settings.max_note_bytes)
    return note.hash, note.text, note.warning


# How each modality is decoded in load_file: (open file, settings) -> (hash, payload, warning).
# The hash is of the whole file, as content_hash would give. Audio is only hashed here: a
# recording is decoded while it is embedded, a window at a time, never held whole.
DECODERS: dict[str, Callable[[BinaryIO, LoadSettings], tuple[str, Any, str | None]]] = {
    IMAGE: _load_image,
    TEXT: _load_note,
}


def load_file(entry: FileEntry, settings: LoadSettings) -> Loaded:
    """Hash and decode one file. Never raises for a bad file: the reason goes in `error`.

    Never blocks on a path that became a FIFO or device since the walk, reads a file once in
    bounded blocks (plus what the decoder reads), and gives up on decoding that takes longer
    than `settings.decode_budget_s`.
    """
    try:
        if entry.modality not in settings.modalities:
            raise LoadError(f"no {entry.modality} tower in this index's model")
        with open_regular(entry.path) as f:
            decode = DECODERS.get(entry.modality)
            if decode is None:
                return Loaded(entry, hash_open_file(f))
            with decode_budget(settings.decode_budget_s):
                digest, payload, warning = decode(f, settings)
        return Loaded(entry, digest, payload, warning=warning)
    except LoadError as e:
        return Loaded(entry, None, error=e.reason)
    except NotRegularFileError as e:
        return Loaded(entry, None, error=e.reason)
    except OSError as e:
        return Loaded(entry, None, error=f"cannot read file: {e.strerror or e}")
    except MemoryError:
        return Loaded(entry, None, error="out of memory while decoding")
