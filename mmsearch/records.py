"""Plain records passed between stages: what was found on disk, what a search returns."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

# The modality names, defined with the rest of each modality in `modalities`; kept importable
# from here, where they always were.
from .modalities import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO  # noqa: F401


def show_path(path: bytes) -> str:
    """A stored path as text; bytes that are not valid UTF-8 become surrogate escapes."""
    return os.fsdecode(path)


def path_fields(path: bytes) -> dict:
    """A path for a JSON row: `path` as text (surrogate escapes for bytes that are not UTF-8)
    and, only for such a name, `path_bytes`, the raw bytes in base64 (ripgrep's {"bytes": ...}),
    since JSON tools turn lone surrogates into U+FFFD."""
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return {"path": show_path(path), "path_bytes": base64.b64encode(path).decode("ascii")}
    return {"path": show_path(path)}


@dataclass(frozen=True)
class FileEntry:
    """A file found on disk under one of the roots being indexed."""

    path: bytes  # absolute, os.fsencode'd: names that are not UTF-8 survive exactly
    modality: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FileMeta:
    """What a file says about itself beyond its stat, read when it is loaded: for a photo, when
    it was taken (EXIF DateTimeOriginal), its size in pixels and its perceptual hash (`phash`).
    None where unknown; a file's mtime stands in for `taken`."""

    taken: float | None = None  # POSIX seconds
    phash: int | None = None  # signed 64-bit, see mmsearch.loaders.phash
    width: int | None = None
    height: int | None = None

    def values(self) -> tuple:
        return (self.taken, self.phash, self.width, self.height)


@dataclass(frozen=True)
class Segment:
    """One embedded unit of a file: the whole file, or a line range / time range of it."""

    start: float | None = None
    end: float | None = None
    text: str | None = None  # the text of a note chunk (what gets embedded)
    # The unit's own modality when it is not the file's (a video's soundtrack: "audio").
    modality: str | None = None


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    path: bytes
    modality: str
    start: float | None = None
    end: float | None = None
    # Calibrated: the estimated probability that the hit is related to the query, comparable
    # across modalities and queries (mmsearch.storage.calibration); `score` is the raw cosine.
    relevance: float | None = None
    snippet: tuple[str, ...] | None = None  # a note hit's lines, from `start` on
    more: int | None = None  # grouped by file: the file's other hits folded into this one

    def to_dict(self) -> dict:
        d = {
            "rank": self.rank,
            "score": round(float(self.score), 6),
            "relevance": None if self.relevance is None else round(float(self.relevance), 4),
            **path_fields(self.path),
            "modality": self.modality,
        }
        if self.start is not None:
            d["start"] = _number(self.start)
            d["end"] = _number(self.end)
        if self.snippet is not None:
            d["snippet"] = list(self.snippet)
        if self.more is not None:
            d["more"] = self.more
        return d


def _number(x: float | None):
    if x is None:
        return None
    return int(x) if float(x).is_integer() else round(float(x), 3)


@dataclass
class IndexReport:
    """What an `index` run did; the CLI prints it, scripts read its --json form."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    moved: int = 0
    unchanged: int = 0
    failed: int = 0  # files currently failing in the index
    failed_now: int = 0  # failures recorded by this run
    files: int = 0  # files now in the index
    vectors: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) from this run
    notes: list[str] = field(default_factory=list)  # damage found and repaired, resumed work
    # (path, what) for files indexed only in part (a note cut at --max-note-bytes); they are
    # also listed by `mmsearch failures`
    partial: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "moved": self.moved,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "files": self.files,
            "vectors": self.vectors,
            "seconds": round(self.seconds, 3),
        }
