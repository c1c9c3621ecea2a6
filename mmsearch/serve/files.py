"""The files a server may send: only files of a served index, named by their id (the content hash
the catalog records for them), never by a path a client gives. Thumbnails are made once and kept
in the index directory (or, where that is read-only, a private temporary directory), never beside
the user's files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from ..config import DEFAULT_MAX_NOTE_BYTES
from ..loaders.files import NotRegularFileError, open_for_decoding, open_regular
from ..modalities import IMAGE, TEXT
from ..storage.catalog import Catalog

ID = re.compile(r"[0-9a-f]{32}")  # blake2b-16 hex, as the catalog's `hash` column holds
THUMB_SIDE = 400  # px, the longer side: sharp in a ~200 px grid cell on a 2x screen
THUMB_QUALITY = 82
MAX_SNIPPET_CHARS = 4000


class NotServed(Exception):
    """No file with that id can be sent (unknown id, or the file is gone): a 404."""


def find(catalog: Catalog, file_id: str) -> tuple[bytes, str, os.stat_result]:
    """The indexed file with that id that is still a regular file: (path, modality, stat)."""
    if not ID.fullmatch(file_id):
        raise NotServed(f"no file with id {file_id!r} in this index")
    for path, modality in catalog.files_with_hash(file_id):
        try:
            with open_regular(path) as f:
                return path, modality, os.fstat(f.fileno())
        except (NotRegularFileError, OSError):
            continue
    raise NotServed(f"no file with id {file_id!r} in this index")


def _image_thumb(path: bytes, out: Path) -> None:
    from ..loaders.image import load_thumbnail

    thumb = load_thumbnail(path, THUMB_SIDE)
    _save_atomically(out, lambda tmp: thumb.save(tmp, "JPEG", quality=THUMB_QUALITY))


# Modalities that have thumbnails, and the function that makes one: (path, out JPEG) -> None.
THUMBNAILS: dict[str, Callable[[bytes, Path], None]] = {IMAGE: _image_thumb}


def _save_atomically(out: Path, write: Callable[[Path], None]) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


class Thumbnails:
    """Thumbnails of one index's files, by id, in `<index>/thumbs/` (or a private temporary
    directory when the index directory cannot be written)."""

    def __init__(self, index_dir: Path):
        self.dir = Path(index_dir) / "thumbs"
        self._temporary = False
        try:
            self.dir.mkdir(exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.dir)  # writable?
            probe.close()
        except OSError:
            self.dir = Path(tempfile.mkdtemp(prefix="mmsearch-thumbs-"))
            self._temporary = True

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self.dir, ignore_errors=True)

    def get(self, catalog: Catalog, file_id: str) -> Path:
        """The thumbnail's path, made now if it was not yet. NotServed when there is none;
        LoadError when the file cannot be decoded."""
        path, modality, _ = find(catalog, file_id)
        make = THUMBNAILS.get(modality)
        if make is None:
            raise NotServed(f"no thumbnail for {modality} files")
        out = self.dir / file_id[:2] / f"{file_id}.jpg"
        if not out.is_file():
            out.parent.mkdir(exist_ok=True)
            make(path, out)
        return out


def note_lines(catalog: Catalog, file_id: str, start: int, end: int) -> str:
    """Lines `start`..`end` (1-based, inclusive, as hits give them) of the note with that id,
    decoded as the indexer decoded it."""
    from ..loaders.text import read_note

    path, modality, _ = find(catalog, file_id)
    if modality != TEXT:
        raise NotServed(f"file {file_id!r} is not a note")
    with open_for_decoding(path) as f:
        text = read_note(f, DEFAULT_MAX_NOTE_BYTES).text
    lines = text.splitlines()[max(start, 1) - 1 : max(end, start)]
    snippet = "\n".join(lines)
    return snippet if len(snippet) <= MAX_SNIPPET_CHARS else snippet[:MAX_SNIPPET_CHARS] + "…"
