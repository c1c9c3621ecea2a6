"""Which files a search may return: path globs, when a file was taken, its size.

A filter is applied before the top k, as the set of vectors the search may look at (see
`Catalog.unit_ids_matching` and `VectorIndex.search`), so it never loses results to -k, on exact
and IVF indexes alike. A leaf module: parsing the user's text and the SQL condition it makes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime

from .errors import UsageError

_GLOB_CHARS = re.compile(r"[*?\[]")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DATE_FORMATS = ("%Y", "%Y-%m")


@dataclass(frozen=True)
class FileFilter:
    """Files a search may return: all of these that are set must hold.

    `paths`: glob patterns on the absolute path (a file matching any of them passes);
    `after`/`before`: when it was taken, POSIX seconds (after: at or after, before: strictly
    before); `min_size`/`max_size`: its size in bytes, inclusive."""

    paths: tuple[bytes, ...] = ()
    after: float | None = None
    before: float | None = None
    min_size: int | None = None
    max_size: int | None = None

    def __bool__(self) -> bool:
        return bool(self.paths) or any(
            v is not None for v in (self.after, self.before, self.min_size, self.max_size)
        )

    @classmethod
    def parse(
        cls,
        paths: list[str] | tuple[str, ...] = (),
        after: str | None = None,
        before: str | None = None,
        min_size: str | None = None,
        max_size: str | None = None,
    ) -> FileFilter:
        """A filter from the command line's text; a bad value is a UsageError naming it."""
        flt = cls(
            paths=tuple(path_pattern(p) for p in paths),
            after=None if after is None else parse_date(after, "--after"),
            before=None if before is None else parse_date(before, "--before"),
            min_size=None if min_size is None else parse_size(min_size, "--min-size"),
            max_size=None if max_size is None else parse_size(max_size, "--max-size"),
        )
        if flt.after is not None and flt.before is not None and flt.after >= flt.before:
            raise UsageError(f"--after {after} is not before --before {before}: nothing matches")
        if flt.min_size is not None and flt.max_size is not None and flt.min_size > flt.max_size:
            raise UsageError(f"--min-size {min_size} is above --max-size {max_size}")
        return flt

    def where(self, taken: str) -> tuple[str, list]:
        """The filter as an SQL condition on the catalog's `files` table (aliased `f`), with its
        arguments; `taken` is the SQL expression of when a file was taken."""
        parts, args = [], []
        if self.paths:
            # SQLite's GLOB: * and ? match any character ('/' too), [...] a set; case-sensitive.
            # Paths are BLOBs (bytes that are not UTF-8 survive), GLOB compares text.
            globs = " OR ".join("CAST(f.path AS TEXT) GLOB CAST(? AS TEXT)" for _ in self.paths)
            parts.append(f"({globs})")
            args += list(self.paths)
        for value, condition in (
            (self.after, f"{taken} >= ?"),
            (self.before, f"{taken} < ?"),
            (self.min_size, "f.size >= ?"),
            (self.max_size, "f.size <= ?"),
        ):
            if value is not None:
                parts.append(condition)
                args.append(value)
        return " AND ".join(parts) or "1", args


def path_pattern(text: str) -> bytes:
    """A --path glob made absolute. One that starts with '/' or a wildcard is kept as written
    ('*.png', '*/2023/*'); '~' is the home folder; any other is relative to the current folder,
    as the shell would take it. A pattern with no wildcard names a file or a folder: it matches
    that path and everything below it."""
    if not text.strip():
        raise UsageError("--path needs a pattern, e.g. --path '*.png' or --path ~/Pictures/2023")
    pattern = os.path.expanduser(text)
    if not (pattern.startswith("/") or _GLOB_CHARS.match(pattern)):
        pattern = os.path.join(os.getcwd(), pattern)
    if not _GLOB_CHARS.search(pattern):
        pattern = os.path.normpath(pattern)
        return os.fsencode(pattern.rstrip("/") + "/*") if pattern != "/" else b"*"
    return os.fsencode(pattern)


def parse_date(text: str, option: str = "date") -> float:
    """POSIX seconds of the start of a date given as YYYY, YYYY-MM, YYYY-MM-DD or an ISO date
    and time (YYYY-MM-DDTHH:MM[:SS], a space for the T, an optional +HH:MM offset); without an
    offset it is local time, as EXIF dates are read."""
    value = text.strip()
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(value, fmt).timestamp()
        except ValueError:
            pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not a date; use YYYY-MM-DD (or YYYY, YYYY-MM, YYYY-MM-DDTHH:MM)"
        ) from None


def parse_size(text: str, option: str = "size") -> int:
    """Bytes from '2000', '10k', '1.5M', '2GB', '3GiB' (K, M, G, T are powers of 1024, as in
    ripgrep's --max-filesize and find -size)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{option} {text!r} is not a size; use bytes or K, M, G (e.g. 10M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
