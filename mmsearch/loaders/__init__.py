"""Loaders turn one file into model input. This module maps extensions to modalities and holds the
worker entry point; it imports nothing heavy so worker processes start fast."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..config import DEFAULT_MAX_NOTE_BYTES
from ..errors import LoadError
from ..modalities import BY_EXTENSION, IMAGE, TEXT
from ..records import FileEntry, FileMeta
from .files import (
    DEFAULT_DECODE_BUDGET_S,
    DecodeTimeout,
    NotRegularFileError,
    content_hash,
    decode_budget,
    file_hash,
    hash_open_file,
    open_for_decoding,
    open_regular,
)

__all__ = [
    "DEFAULT_DECODE_BUDGET_S", "DECODERS", "DecodeTimeout", "LoadSettings", "Loaded",
    "NotRegularFileError", "content_hash", "decode_budget", "file_hash", "hash_open_file",
    "load_file", "modality_of", "open_for_decoding", "open_regular",
]  # fmt: skip


def modality_of(name: bytes | str) -> str | None:
    """The modality a file name's extension says (see `modalities.TABLE`), or None."""
    ext = os.path.splitext(os.fsdecode(name))[1].lower()
    return BY_EXTENSION.get(ext)


@dataclass(frozen=True)
class LoadSettings:
    """What workers need to know to turn files into model input (picklable)."""

    image_prep: Any = None  # config.ImagePrep
    modalities: frozenset = frozenset({IMAGE, TEXT})
    max_note_bytes: int = DEFAULT_MAX_NOTE_BYTES  # what a note contributes; the rest is a warning
    # Seconds one file's decoding may take before it is recorded as a failure; None: no limit.
    # Enforced with SIGALRM, so only where load_file runs in a process's main thread (decode
    # workers, the in-process path); elsewhere (threads) decoding is not timed.
    decode_budget_s: float | None = DEFAULT_DECODE_BUDGET_S
    # The image tower runs on a GPU: JPEGs nvjpeg can decode are passed on as their bytes
    # (image.JpegBytes), decoded in batches on the device (gpu_jpeg.py); the rest decode here.
    jpeg_bytes: bool = False


@dataclass
class Loaded:
    entry: FileEntry
    hash: str | None
    payload: Any = None  # image: uint8 array (or JpegBytes); text: str; audio: windows
    error: str | None = None
    # Something the user should know about a file that was loaded (e.g. a note cut at
    # max_note_bytes): the file is indexed; for the indexer to report beside the failures.
    warning: str | None = None
    meta: FileMeta | None = None  # what the file says about itself (photos), for the catalog


# What a decoder gives: (hash of the whole file, payload, warning, meta).
Decoded = tuple[str, Any, str | None, FileMeta | None]


def _load_image(f: BinaryIO, settings: LoadSettings) -> Decoded:
    from . import image

    with image.open_image(f) as img:  # the header only: a non-image is refused before reading on
        digest = hash_open_file(f)
        if settings.jpeg_bytes and image.device_decodable(img):
            f.seek(0)
            data = f.read()
            if image.ends_whole(data):  # for the GPU (gpu_jpeg.py), once its header is read
                meta, orientation = image.photo_header(img)
                return digest, image.JpegBytes(data, orientation), None, meta
        payload, meta = image.decode_photo(img, settings.image_prep)
        return digest, payload, None, meta


def _load_note(f: BinaryIO, settings: LoadSettings) -> Decoded:
    from .text import read_note

    note = read_note(f, settings.max_note_bytes)
    return note.hash, note.text, note.warning, None


# How each modality is decoded in load_file: (open file, settings) -> (hash, payload, warning,
# meta). The hash is of the whole file, as content_hash would give. Audio is only hashed here: a
# recording is decoded while it is embedded, a window at a time, never held whole.
DECODERS: dict[str, Callable[[BinaryIO, LoadSettings], Decoded]] = {
    IMAGE: _load_image,
    TEXT: _load_note,
}


def load_file(entry: FileEntry, settings: LoadSettings) -> Loaded:
    """Hash and decode one file. Never raises for a bad file: the reason goes in `error`.

    Never blocks on a path that became a FIFO or device since the walk, reads a file once in
    bounded blocks (plus what the decoder reads), and gives up on decoding that takes longer
    than `settings.decode_budget_s`.
    """
    try:
        if entry.modality not in settings.modalities:
            raise LoadError(f"no {entry.modality} tower in this index's model")
        with open_regular(entry.path) as f:
            decode = DECODERS.get(entry.modality)
            if decode is None:
                return Loaded(entry, hash_open_file(f))
            with decode_budget(settings.decode_budget_s):
                digest, payload, warning, meta = decode(f, settings)
        return Loaded(entry, digest, payload, warning=warning, meta=meta)
    except LoadError as e:
        return Loaded(entry, None, error=e.reason)
    except NotRegularFileError as e:
        return Loaded(entry, None, error=e.reason)
    except OSError as e:
        return Loaded(entry, None, error=f"cannot read file: {e.strerror or e}")
    except MemoryError:
        return Loaded(entry, None, error="out of memory while decoding")
