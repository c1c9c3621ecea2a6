"""Loaders turn one file into model input. This module maps extensions to modalities and holds the
worker entry point; it imports nothing heavy so worker processes start fast."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from ..errors import LoadError
from ..items import AUDIO, IMAGE, TEXT, FileEntry

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TEXT_EXTENSIONS = frozenset({".txt", ".md"})
# libsndfile's formats; .m4a is listed so that without a decoder it is recorded as a failure
# with its reason rather than silently ignored.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aiff", ".aif", ".aifc",
     ".au", ".caf", ".w64"}
)  # fmt: skip

_BY_EXT = {
    **{e: IMAGE for e in IMAGE_EXTENSIONS},
    **{e: TEXT for e in TEXT_EXTENSIONS},
    **{e: AUDIO for e in AUDIO_EXTENSIONS},
}


def modality_of(name: bytes | str) -> str | None:
    ext = os.path.splitext(os.fsdecode(name))[1].lower()
    return _BY_EXT.get(ext)


@dataclass(frozen=True)
class LoadSettings:
    """What workers need to know to turn files into model input (picklable)."""

    image_prep: Any = None  # config.ImagePrep
    audio: Any = None  # audio loader settings (sample rate, window), or None when no audio tower
    modalities: frozenset = frozenset({IMAGE, TEXT})


@dataclass
class Loaded:
    entry: FileEntry
    hash: str | None
    payload: Any = None  # image: uint8 array; text: str; audio: windows
    error: str | None = None


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_hash(path: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_file(entry: FileEntry, settings: LoadSettings) -> Loaded:
    """Hash and decode one file. Never raises for a bad file: the reason goes in `error`."""
    try:
        if entry.modality not in settings.modalities:
            raise LoadError(f"no {entry.modality} tower in this index's model")
        if entry.modality == AUDIO:
            # Recordings can be hours long: they are decoded while being embedded, a window at a
            # time (see indexer._embed), never held whole.
            return Loaded(entry, file_hash(entry.path))
        with open(entry.path, "rb") as f:
            data = f.read()
        digest = content_hash(data)
        if entry.modality == IMAGE:
            import io

            from .image import load_image

            return Loaded(entry, digest, load_image(io.BytesIO(data), settings.image_prep))
        from .text import decode_note

        return Loaded(entry, digest, decode_note(data))
    except LoadError as e:
        return Loaded(entry, None, error=e.reason)
    except OSError as e:
        return Loaded(entry, None, error=f"cannot read file: {e.strerror or e}")
    except MemoryError:
        return Loaded(entry, None, error="out of memory while decoding")
