"""Making a ranked list readable: a note hit's matching lines (a snippet, as ripgrep shows them)
and a file's hits collapsed into one row."""

from __future__ import annotations

import dataclasses
import os

from ..records import Hit

SNIPPET_LINES = 4  # lines of a note hit shown, from the first of its range
SNIPPET_CHARS = 200  # characters of each line kept
READ_LIMIT = 64 << 20  # bytes of a note read to find its lines


def note_lines(
    path: bytes, start: float, end: float, size: int | None = None, mtime_ns: int | None = None
) -> tuple[str, ...] | None:
    """Lines `start`..`end` (1-based, inclusive) of a note, at most SNIPPET_LINES of them, each
    cut at SNIPPET_CHARS (a cut line ends in '…'). Decoded as the indexer decodes notes. None
    when the file cannot be read, or when its `size`/`mtime_ns` (as indexed) say it changed
    since: its lines would not be the ones that matched."""
    from ..errors import LoadError
    from ..loaders import open_regular
    from ..loaders.text import decode_note

    try:
        st = os.stat(path)
        if size is not None and (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            return None
        with open_regular(path) as f:
            text = decode_note(f.read(READ_LIMIT))
    except (OSError, LoadError):
        return None
    first = max(int(start), 1)
    last = min(int(end), first + SNIPPET_LINES - 1)
    lines = text.splitlines()[first - 1 : last]
    return tuple(
        line if len(line) <= SNIPPET_CHARS else line[:SNIPPET_CHARS] + "…" for line in lines
    )


def group_by_file(hits: list[Hit], k: int) -> list[Hit]:
    """The first k files of a ranked list, one row each at its best hit (that hit's segment),
    with `more` counting the file's other hits ranked at or above the last row: the passages
    that would have been shown, had the list not been grouped."""
    best: dict[bytes, Hit] = {}
    for hit in hits:
        best.setdefault(hit.path, hit)
    rows = list(best.values())[:k]
    if not rows:
        return []
    last = next(i for i, h in enumerate(hits) if h is rows[-1])
    count: dict[bytes, int] = {}
    for hit in hits[: last + 1]:
        count[hit.path] = count.get(hit.path, 0) + 1
    return [dataclasses.replace(h, more=count[h.path] - 1) for h in rows]


def renumber(hits: list[Hit]) -> list[Hit]:
    """Ranks 1, 2, 3... in list order."""
    return [dataclasses.replace(h, rank=i) for i, h in enumerate(hits, start=1)]
