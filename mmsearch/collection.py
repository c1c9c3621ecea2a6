"""An index directory: manifest.json, catalog.sqlite, vectors.faiss and the writer lock.

Crash safety: the catalog (SQLite, WAL) is committed in chunks and holds every vector; the FAISS
file is saved after a run, stamped with the catalog generation it reflects. A reader that finds the
stamp behind the catalog (a run was killed) rebuilds the vectors from the catalog in memory.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path

from .errors import (
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    ModelMismatchError,
    UsageError,
)
from .index import VectorIndex
from .store import Catalog

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CATALOG = "catalog.sqlite"
VECTORS = "vectors.faiss"
LOCK = "lock"
AUDIO_PROJECTOR = "audio_projector.safetensors"  # the projector the index's audio was embedded with
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UsageError(
            f"invalid index name {name!r}: use letters, digits, '.', '_' and '-' (no slashes)"
        )
    return name


def list_indexes(root_dir: Path) -> list[str]:
    root_dir = Path(root_dir)
    if not root_dir.is_dir():
        return []
    return sorted(p.name for p in root_dir.iterdir() if (p / MANIFEST).is_file())


def model_cache_dir(root_dir: Path, key: str) -> Path:
    """Where derived model artifacts (the torch-free query tower) live, shared by indexes."""
    return Path(root_dir) / ".models" / key


class Collection:
    def __init__(self, root_dir: Path, name: str, writer: bool):
        self.root_dir = Path(root_dir)
        self.name = check_name(name)
        self.dir = self.root_dir / name
        self.writer = writer
        self._lock_fd: int | None = None
        self._vectors: VectorIndex | None = None
        self.manifest: dict = {}
        self.catalog: Catalog | None = None

    # --- opening --------------------------------------------------------------------------
    @classmethod
    def open_reader(cls, root_dir: Path, name: str) -> Collection:
        col = cls(root_dir, name, writer=False)
        if not (col.dir / MANIFEST).is_file():
            known = list_indexes(root_dir)
            hint = f"; indexes in {root_dir}: {', '.join(known)}" if known else ""
            raise IndexNotFoundError(
                f"no index named {name!r} in {Path(root_dir).resolve()} "
                f"(create it with: mmsearch index PATH --index {name}){hint}"
            )
        col.manifest = col._read_manifest()
        col.catalog = Catalog(col.dir / CATALOG, readonly=True)
        return col

    @classmethod
    def open_writer(cls, root_dir: Path, name: str) -> Collection:
        col = cls(root_dir, name, writer=True)
        col.dir.mkdir(parents=True, exist_ok=True)
        col._lock()
        try:
            if (col.dir / MANIFEST).is_file():
                col.manifest = col._read_manifest()
            col.catalog = Catalog(col.dir / CATALOG)
        except BaseException:
            col.close()
            raise
        return col

    def _lock(self) -> None:
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise IndexLockedError(
                f"index {self.name!r} is being written by another mmsearch process"
                + (f" (pid {holder})" if holder else "")
                + "; wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- manifest ---------------------------------------------------------------------------
    def _read_manifest(self) -> dict:
        try:
            manifest = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"index {self.name!r}: unreadable manifest.json ({e})") from None
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"index {self.name!r} has format version {version}; this mmsearch reads "
                f"version {FORMAT_VERSION}. Rebuild it with: mmsearch index PATH --index "
                f"{self.name} --rebuild"
            )
        return manifest

    def write_manifest(self, **updates) -> None:
        self.manifest.update(updates)
        self.manifest["format_version"] = FORMAT_VERSION
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.manifest.setdefault("created", self.manifest["updated"])
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.dir / MANIFEST)

    @property
    def exists(self) -> bool:
        return bool(self.manifest)

    @property
    def encoder_identity(self) -> dict | None:
        return self.manifest.get("encoder")

    def check_encoder(self, identity: dict) -> None:
        """Refuse to mix vectors of two models in one index."""
        mine = self.manifest.get("encoder")
        if mine and mine.get("key") != identity.get("key"):
            raise ModelMismatchError(
                f"index {self.name!r} was built with model {mine.get('spec')} "
                f"(weights {mine.get('weights')}), not {identity.get('spec')} "
                f"(weights {identity.get('weights')}). Use the index's model, or re-embed "
                f"everything with the new one: mmsearch index PATH --index {self.name} "
                f"--model {identity.get('spec')} --rebuild"
            )

    # --- vectors ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def vectors(self) -> VectorIndex:
        if self._vectors is None:
            self._vectors = self._load_vectors()
        return self._vectors

    def _load_vectors(self) -> VectorIndex:
        path = self.dir / VECTORS
        generation = self.catalog.generation()
        if path.is_file() and self.manifest.get("vectors_generation") == generation:
            try:
                return VectorIndex.load(path, self.dim)
            except (RuntimeError, ValueError):
                pass  # damaged file: rebuilt from the catalog below
        ids, vecs = self.catalog.all_vectors(self.dim)
        return VectorIndex.build(self.dim, ids, vecs)

    def save_vectors(self) -> None:
        if self._vectors is None:
            return
        self._vectors.save(self.dir / VECTORS)
        self.write_manifest(
            vectors_generation=self.catalog.generation(),
            index_type="IDMap2,FlatIP",
            vectors=self._vectors.ntotal,
        )

    def reset(self) -> None:
        """Empty the index (for --rebuild): catalog rows, vectors and the encoder record."""
        with self.catalog.transaction():
            self.catalog.clear()
        self._vectors = None
        (self.dir / VECTORS).unlink(missing_ok=True)
        self.manifest.pop("encoder", None)
        self.manifest.pop("audio_encoder", None)


def remove_index(root_dir: Path, name: str) -> None:
    col = Collection.open_writer(root_dir, name)
    try:
        shutil.rmtree(col.dir)
    finally:
        col.close()
