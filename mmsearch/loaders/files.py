"""Reading one file safely: open only regular files (never block on a FIFO or device), hash
what is read, and bound the time a decoder may take. A leaf of the loaders (nothing heavy)."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from ..errors import LoadError

DEFAULT_DECODE_BUDGET_S = 60.0


HASH_BLOCK = 1 << 20  # bytes read at a time when hashing


_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # absent on Windows, which has no FIFOs to open


_O_NOCTTY = getattr(os, "O_NOCTTY", 0)


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
