"""Read (file, caption) pairs from CSV/TSV/JSONL files or from a folder with sidecar captions.

A pair that cannot be used (missing file, empty caption, unknown file type, unreadable row) is
recorded in `PairSet.skipped` with its reason and left out; reading never stops at a bad row.

Relative paths stay inside the pairs file's folder: one that leads out of it (`../`) is skipped
unless `allow_outside` is given, so a pairs file from elsewhere cannot quietly pull in other
files of the user's. Absolute paths are the user's explicit choice and are read, but every file
used from outside the folder is listed in `PairSet.outside` for the summary.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..loaders import modality_of as _modality_by_extension
from ..records import AUDIO, IMAGE

PATH_KEYS = (
    "path", "filepath", "file_path", "filepaths", "file", "filename", "file_name",
    "image", "image_path", "img", "img_path", "audio", "audio_path", "media",
)  # fmt: skip
CAPTION_KEYS = (
    "caption", "captions", "text", "title", "description", "label", "sentence", "prompt",
)  # fmt: skip

# Reason keys: the part of a reason before ':' is what `skipped_counts` groups by.
MISSING = "missing file"
EMPTY = "empty caption"
NO_PATH = "no path"
UNSUPPORTED = "unsupported file type"
BAD_ROW = "unreadable row"
NO_CAPTION_FILE = "no caption file"
NO_CAPTION = "no caption"
UNDECODABLE = "undecodable"
OUTSIDE = "outside the pairs file's folder"


@dataclass(frozen=True)
class Pair:
    path: Path  # absolute
    caption: str
    modality: str  # "image" | "audio"


@dataclass(frozen=True)
class Skipped:
    where: str  # "pairs.csv:12" or the media file
    reason: str  # "missing file: photos/a.jpg"

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass
class PairSet:
    """Usable pairs plus the ones left out, with reasons."""

    pairs: list[Pair] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    source: Path | None = None
    outside: list[Path] = field(default_factory=list)  # files read from outside the folder

    def __len__(self) -> int:
        return len(self.pairs)

    def of(self, modality: str) -> PairSet:
        return PairSet([p for p in self.pairs if p.modality == modality], [], self.source)

    def files(self) -> list[Path]:
        """Distinct files, in first-seen order."""
        return list(dict.fromkeys(p.path for p in self.pairs))

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(s.kind for s in self.skipped))


def split_by_file(pairs: PairSet, val_fraction: float, seed: int = 0) -> tuple[PairSet, PairSet]:
    """(train, held-out): a seeded random `val_fraction` of the distinct files goes to held-out with
    all its captions, so no file's captions straddle the split. Skipped records stay with train."""
    files = sorted(set(p.path for p in pairs.pairs))
    n_val = int(round(val_fraction * len(files)))
    if val_fraction > 0 and len(files) > 1:
        n_val = min(max(n_val, 1), len(files) - 1)
    perm = np.random.default_rng(seed).permutation(len(files))
    held = {files[i] for i in perm[:n_val]}
    train = PairSet(
        [p for p in pairs.pairs if p.path not in held], list(pairs.skipped), pairs.source
    )
    val = PairSet([p for p in pairs.pairs if p.path in held], [], pairs.source)
    return train, val


def read_pairs(
    source: str | os.PathLike,
    path_key: str | None = None,
    caption_key: str | None = None,
    allow_outside: bool = False,
    captions_from: tuple[str, ...] = ("sidecar",),
) -> PairSet:
    """Pairs from a .csv/.tsv (header row), a .jsonl file, or a folder whose files' captions come
    from `captions_from` (any of `captions.SOURCES`: sidecar .txt files, XMP/IPTC descriptions and
    keywords embedded in photos, folder names; every distinct caption found is a pair; a pairs
    file names its captions itself).

    Column names are guessed (path/file/image..., caption/text/...) unless given. Relative paths are
    resolved against the folder of the pairs file and must stay inside it unless `allow_outside`;
    files used from outside it (absolute paths, or `../` with `allow_outside`) are listed in
    `outside`.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        return _read_folder(source, tuple(captions_from))
    if not source.is_file():
        raise UsageError(f"pairs file or folder not found: {source}")
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(source, path_key, caption_key, allow_outside)
    if suffix in (".csv", ".tsv"):
        return _read_table(source, path_key, caption_key, allow_outside)
    raise UsageError(
        f"{source}: pairs must be a .csv, .tsv or .jsonl file, or a folder with captions"
    )


def clean_caption(text) -> str:
    return re.sub(r"\s+", " ", str(text)).strip() if text is not None else ""


def modality_of(path: Path) -> str | None:
    """image or audio (audio pairs train the audio projector, `finetune.audio`); None for
    anything else, notes included."""
    m = _modality_by_extension(str(path))
    return m if m in (IMAGE, AUDIO) else None


class _Builder:
    def __init__(self, source: Path, allow_outside: bool = False):
        self.set = PairSet(source=source)
        self.base = source.parent if source.is_file() else source
        self.root = Path(os.path.abspath(self.base))
        self.allow_outside = allow_outside
        self.outside: set[Path] = set()

    def add(self, where: str, raw_path, caption) -> None:
        raw = "" if raw_path is None else str(raw_path).strip()
        if not raw:
            self.set.skipped.append(Skipped(where, NO_PATH))
            return
        path = Path(raw).expanduser()
        relative = not path.is_absolute()
        if relative:
            path = self.base / path
        path = Path(os.path.abspath(path))  # `..` resolved, as the path is written
        inside = path.is_relative_to(self.root)
        modality = modality_of(path)
        text = clean_caption(caption)
        if relative and not inside and not self.allow_outside:
            self.set.skipped.append(Skipped(where, f"{OUTSIDE}: {raw}"))
        elif modality is None:
            self.set.skipped.append(Skipped(where, f"{UNSUPPORTED}: {raw}"))
        elif not path.is_file():
            self.set.skipped.append(Skipped(where, f"{MISSING}: {raw}"))
        elif not text:
            self.set.skipped.append(Skipped(where, f"{EMPTY}: {raw}"))
        else:
            self.set.pairs.append(Pair(path, text, modality))
            if not inside and path not in self.outside:
                self.outside.add(path)
                self.set.outside.append(path)


def _pick(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: Path
) -> str:
    by_lower = {c.strip().lower(): c for c in columns if c is not None}
    if wanted:
        if wanted in columns:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
        raise UsageError(f"{source}: no column {wanted!r} (columns: {', '.join(columns)})")
    for c in candidates:
        if c in by_lower:
            return by_lower[c]
    raise UsageError(
        f"{source}: no {what} column found among {', '.join(columns)}; expected one of "
        f"{', '.join(candidates)}"
    )


def _read_table(
    source: Path, path_key: str | None, caption_key: str | None, allow_outside: bool
) -> PairSet:
    delimiter = "\t" if source.suffix.lower() == ".tsv" else ","
    b = _Builder(source, allow_outside)
    with open(source, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return b.set
        if path_key is None and caption_key is None and _looks_like_data(header, b.base):
            rows, pcol, ccol = [header], 0, 1  # no header row: path, caption
            line0 = 1
        else:
            pname = _pick(header, path_key, PATH_KEYS, "path", source)
            cname = _pick(header, caption_key, CAPTION_KEYS, "caption", source)
            pcol, ccol = header.index(pname), header.index(cname)
            rows, line0 = [], 2
        for offset, row in enumerate(_chain(rows, reader)):
            where = f"{source.name}:{line0 + offset}"
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(pcol, ccol):
                b.set.skipped.append(Skipped(where, f"{BAD_ROW}: {len(row)} columns"))
                continue
            b.add(where, row[pcol], row[ccol])
    return b.set


def _chain(first: list, rest):
    yield from first
    yield from rest


def _looks_like_data(header: list[str], base: Path) -> bool:
    if len(header) != 2:
        return False
    first = Path(header[0].strip()).expanduser()
    return (
        modality_of(first) is not None
        and (first if first.is_absolute() else base / first).is_file()
    )


def _read_jsonl(
    source: Path, path_key: str | None, caption_key: str | None, allow_outside: bool
) -> PairSet:
    b = _Builder(source, allow_outside)
    pname = cname = None
    with open(source, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, 1):
            where = f"{source.name}:{n}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                b.set.skipped.append(Skipped(where, f"{BAD_ROW}: invalid JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                b.set.skipped.append(Skipped(where, f"{BAD_ROW}: not a JSON object"))
                continue
            if pname is None:  # columns are fixed by the first object
                pname = _pick(list(obj), path_key, PATH_KEYS, "path", source)
                cname = _pick(list(obj), caption_key, CAPTION_KEYS, "caption", source)
            caption = obj.get(cname)
            if isinstance(caption, list):  # {"path": ..., "captions": ["a", "b"]}
                for c in caption:
                    b.add(where, obj.get(pname), c)
            else:
                b.add(where, obj.get(pname), caption)
    return b.set


def _read_folder(root: Path, sources: tuple[str, ...]) -> PairSet:
    """Every image/audio file under `root` with the captions its `sources` give it."""
    from .captions import embedded_captions, folder_captions

    b = _Builder(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            modality = modality_of(path)
            if name.startswith(".") or modality is None:
                continue
            where = str(path.relative_to(root))
            captions: list[str] = []
            for source in sources:
                if source == "sidecar":
                    captions += _sidecar(b, path, names, where, only=sources == ("sidecar",))
                elif source == "xmp" and modality == IMAGE:
                    captions += embedded_captions(path)
                elif source == "folders":
                    captions += folder_captions(path, root)
            distinct = list(dict.fromkeys(c for c in map(clean_caption, captions) if c))
            if not distinct and sources == ("sidecar",):
                if captions:  # an empty sidecar: recorded as an empty caption
                    b.add(where, path, captions[0])
            elif not distinct:
                tried = ", ".join(sources)
                b.set.skipped.append(Skipped(where, f"{NO_CAPTION}: none from {tried}"))
            for caption in distinct:
                b.add(where, path, caption)
    return b.set


def _sidecar(b: _Builder, path: Path, names: set, where: str, only: bool) -> list[str]:
    """The same-stem .txt beside `path` as one caption. When it is the only source, its absence
    or a read error is recorded as the file's reason."""
    sidecar = path.stem + ".txt"
    if sidecar not in names:
        if only:
            b.set.skipped.append(Skipped(where, f"{NO_CAPTION_FILE}: {sidecar}"))
        return []
    try:
        return [(path.parent / sidecar).read_text(encoding="utf-8", errors="replace")]
    except OSError as e:
        if only:
            b.set.skipped.append(Skipped(where, f"{BAD_ROW}: cannot read {sidecar}: {e.strerror}"))
        return []
