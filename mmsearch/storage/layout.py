"""The files of an index root: the names inside an index directory, what the catalog records
besides its rows, index names, and where derived model artifacts are cached."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError
from . import calibration
from .vector_file import VECTORS

MANIFEST = "manifest.json"
CATALOG = "catalog.sqlite"
LOCK = "lock"
AUDIO_PROJECTOR = "audio_projector.safetensors"  # the projector the index's audio was embedded with
DATA_FILES = (
    CATALOG, CATALOG + "-wal", CATALOG + "-shm", VECTORS, AUDIO_PROJECTOR, calibration.FILE
)  # fmt: skip
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# What the catalog records besides its rows (so a lost manifest can be rebuilt from it).
META_ENCODER, META_AUDIO, META_STATE = "encoder", "audio_encoder", "state"


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise UsageError(
            f"invalid index name {name!r}: use letters, digits, '.', '_' and '-' (no slashes)"
        )
    return name


def list_indexes(root_dir: Path) -> list[str]:
    root_dir = Path(root_dir)
    if not root_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in root_dir.iterdir()
        if NAME.match(p.name) and ((p / MANIFEST).is_file() or (p / CATALOG).is_file())
    )


def model_cache_dir(root_dir: Path, key: str) -> Path:
    """Where derived model artifacts (the torch-free query tower) live, shared by indexes."""
    return Path(root_dir) / ".models" / key


def rebuild_hint(name: str) -> str:
    return f"rebuild it with: mmsearch index PATH --index {name} --rebuild"
