"""Writing files inside an index directory that other people may be able to plant links in.

Temporary files are created with mkstemp (O_EXCL: a planted name or link is never opened) in the
target's directory and renamed over the target, so readers see the old file or the new one; the
lock file is opened with O_NOFOLLOW. Disk full and permission errors become IndexWriteError, one
line naming the file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import IndexWriteError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def write_error(path: Path, e: OSError, index: bool = True) -> IndexWriteError:
    """One line for a failed write: what, where, and what to do. `index`: the file is part of
    an index (what becomes of the index is said too)."""
    short_write = e.errno is None and "written" in str(e)  # numpy's tofile on a full disk
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or short_write:
        kept = "; the index is kept as of its last commit" if index else ""
        return IndexWriteError(
            f"disk full while writing {path}{kept}. Free some space and run the command again"
        )
    if e.errno == errno.EROFS:
        why = " (an index there can be searched, not changed)" if index else ""
        return IndexWriteError(f"cannot write {path}: read-only file system{why}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return IndexWriteError(f"cannot write {path}: {e.strerror} (check its permissions)")
    return IndexWriteError(f"cannot write {path}: {e.strerror or e}")


def replace_file(
    path: Path, write: Callable[[BinaryIO], None], mode: int = 0o644, index: bool = True
) -> None:
    """Write `path` atomically through `write(file)`; fsync'd before the rename. `index`: the
    file is part of an index (see write_error)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise write_error(path, e, index) from None
    except BaseException:
        _discard(tmp)
        raise


def replace_text(path: Path, text: str) -> None:
    replace_file(path, lambda f: f.write(text.encode()))


def open_lock(path: Path) -> int:
    """The lock file's descriptor; a link planted at `path` is refused, not followed."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IndexWriteError(
                f"{path} is a symbolic link; mmsearch does not follow links in an index "
                "directory. Remove it and run again"
            ) from None
        raise write_error(Path(path), e) from None


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass
