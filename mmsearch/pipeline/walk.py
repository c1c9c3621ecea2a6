"""Find the files under the roots being indexed: which are media, which modality, their stat."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from ..errors import UsageError
from ..loaders import modality_of
from ..records import FileEntry


def absolute(path: str | os.PathLike) -> bytes:
    """Absolute path as bytes, without resolving symlinks (a link is indexed at its own path)."""
    return os.path.abspath(os.fsencode(os.path.expanduser(os.fspath(path))))


def check_roots(roots: list[str | os.PathLike]) -> list[bytes]:
    """Absolute roots; a root that does not exist is an error, never 'delete everything under it'."""
    if not roots:
        raise UsageError("no paths given to index")
    out = []
    for root in roots:
        p = absolute(root)
        if not os.path.exists(p):
            raise UsageError(f"path does not exist: {os.fsdecode(p)}")
        out.append(p)
    return out


def walk(
    roots: list[bytes], hidden: bool = False, follow_links: bool = False
) -> Iterator[FileEntry]:
    """Media files under `roots`, each once, in a stable order. Unknown extensions are ignored.

    Hidden names (starting with '.') are skipped unless `hidden`; directory links are followed only
    with `follow_links`, and then a directory already visited is never entered again, so link
    loops cannot hang. Dangling links are skipped.
    """
    seen_files: set[bytes] = set()
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        st = _stat(root)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(root, st, hidden, follow_links, seen_dirs, seen_files)
        else:
            entry = _entry(root, st)
            if entry and root not in seen_files:
                seen_files.add(root)
                yield entry


def _walk_dir(top, top_st, hidden, follow_links, seen_dirs, seen_files):
    stack = [(top, top_st)]
    while stack:
        path, st = stack.pop()
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            continue
        seen_dirs.add(key)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # unreadable directory: nothing under it can be indexed or removed safely
        subdirs = []
        for e in entries:
            if not hidden and e.name.startswith(b"."):
                continue
            try:
                is_link = e.is_symlink()
                is_dir = e.is_dir(follow_symlinks=follow_links)
            except OSError:
                continue
            if is_dir:
                if is_link and not follow_links:
                    continue
                sub_st = _stat(e.path)
                if sub_st is not None:
                    subdirs.append((e.path, sub_st))
                continue
            if modality_of(e.name) is None:
                continue
            f_st = _stat(e.path)  # follows links; None for dangling ones
            if f_st is None or not stat.S_ISREG(f_st.st_mode) or e.path in seen_files:
                continue
            entry = _entry(e.path, f_st)
            if entry:
                seen_files.add(e.path)
                yield entry
        stack.extend(reversed(subdirs))


def _stat(path: bytes):
    try:
        return os.stat(path)
    except OSError:
        return None


def _entry(path: bytes, st) -> FileEntry | None:
    modality = modality_of(path)
    if modality is None or not stat.S_ISREG(st.st_mode):
        return None
    return FileEntry(path=path, modality=modality, size=st.st_size, mtime_ns=st.st_mtime_ns)
