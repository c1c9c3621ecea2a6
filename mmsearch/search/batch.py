"""Batch queries (`mmsearch search --queries FILE`): one query per line, answered in one process.

A line is what follows `mmsearch search` for one query: a text query with the command line's
arithmetic ('beach + sunset - people', '2:sunset'), optionally `--image FILE` and/or `--audio
FILE` (quoted when the path has spaces; relative to the current folder). Blank lines are skipped.
Every line is checked before any index or model is opened: a bad one is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .searcher import check_query

_FILE_OPTION = re.compile(r"""(?:^|\s)--(image|audio)(?:=|\s+)("[^"]*"|'[^']*'|\S+)""")
# search's other options ('-people' is a negated term, not an option)
_OTHER_OPTION = re.compile(r"(?:^|\s)(--[A-Za-z][\w-]*|-[kti])(?=\s|=|$)")


@dataclass(frozen=True)
class BatchQuery:
    line: int  # 1-based, in the file
    text: str  # the line as written (a JSON row's `query`)
    query: str | None  # its text part
    image: Path | None = None
    audio: Path | None = None


def parse_line(text: str, line: int = 1) -> BatchQuery | None:
    """One line of a queries file; None for a blank one. Raises UsageError naming the line."""
    text = text.rstrip("\r\n")
    if not text.strip():
        return None
    files: dict[str, Path] = {}

    def take(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name in files:
            raise UsageError(f"line {line}: --{name} given twice")
        if value[:1] in "\"'" and len(value) >= 2:
            value = value[1:-1]
        files[name] = Path(value)
        return " "

    rest = _FILE_OPTION.sub(take, text).strip()
    other = _OTHER_OPTION.search(rest)
    if other:
        raise UsageError(
            f"line {line}: {other.group(1)} cannot be given per query (only --image and "
            "--audio); put it on the command line, where it applies to every query"
        )
    query = BatchQuery(line, text, rest or None, files.get("image"), files.get("audio"))
    try:
        check_query(query.query, query.image, query.audio)
    except UsageError as e:
        raise UsageError(f"line {line}: {e}") from None
    return query


def read_queries(lines: Iterable[str], source: str = "the queries file") -> list[BatchQuery]:
    """The queries of a file's lines, in order (blank lines skipped); at least one."""
    out = [q for n, text in enumerate(lines, start=1) if (q := parse_line(text, n)) is not None]
    if not out:
        raise UsageError(f"no queries in {source} (one per line; blank lines are skipped)")
    return out
