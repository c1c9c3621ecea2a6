"""An index directory: manifest.json, the writer lock, and one generation of data (catalog.sqlite,
vectors.faiss, the audio projector) in the directory the manifest names.

Crash safety:
- The catalog (SQLite, WAL) is committed in chunks and holds every vector and the encoder identity;
  the FAISS file is saved after a run, stamped with the catalog generation it reflects. A reader that
  finds the stamp behind the catalog (a run was killed) rebuilds the vectors from the catalog.
- A rebuild (a new model, align-audio, or repairing damage) writes a new generation in a directory
  of its own beside the old one; only when it is complete does the manifest (replaced atomically)
  point at it. Killed or failed, the old generation answers as before, and the next rebuild resumes.
- A manifest that is lost or damaged is rebuilt from the catalog, which records the encoder too.

The file names and index names are in layout.py, rebuilds in generation.py, vectors.faiss in
vector_file.py; this class holds the open index and the invariant that ties them together.
"""

from __future__ import annotations

import copy
import fcntl
import os
import sqlite3
from pathlib import Path

from ..encoders.base import EncoderIdentity
from ..errors import (
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    ModelMismatchError,
)
from .atomic import open_lock
from .catalog import Catalog
from .generation import GenerationsMixin
from .layout import (
    AUDIO_PROJECTOR,
    CATALOG,
    LOCK,
    MANIFEST,
    META_AUDIO,
    META_ENCODER,
    META_STATE,
    NAME,
    check_name,
    list_indexes,
    rebuild_hint,
)
from .manifest import FORMAT_VERSION, Manifest
from .vector_file import VectorFileMixin
from .vectors import VectorIndex


class Collection(VectorFileMixin, GenerationsMixin):
    def __init__(self, root_dir: Path, name: str, writer: bool):
        self.root_dir = Path(root_dir)
        self.name = check_name(name)
        self.dir = self.root_dir / name
        self.writer = writer
        self._lock_fd: int | None = None
        self._vectors: VectorIndex | None = None  # loaded on first use (VectorFileMixin)
        self.manifest = Manifest()
        self.catalog: Catalog | None = None
        # A rebuild in progress: the new generation's directory, and the old catalog it may
        # salvage vectors from (same encoder identity only).
        self.building: Path | None = None
        self.salvage: Catalog | None = None
        self.live: Catalog | None = None  # the live catalog while a rebuild writes another
        # the identities of the generation being built: {"encoder": ..., "audio": ...}
        self.new_identity: dict[str, EncoderIdentity | None] = {}
        self.damaged: list[Path] = []  # data files a rebuild sets aside
        self.notes: list[str] = []  # what was repaired or found (the CLI shows them)

    # --- opening --------------------------------------------------------------------------
    @classmethod
    def open_reader(cls, root_dir: Path, name: str) -> Collection:
        col = cls(root_dir, name, writer=False)
        try:
            col._open(repair=False)
        except BaseException:
            col.close()
            raise
        return col

    @classmethod
    def open_writer(cls, root_dir: Path, name: str, repair: bool = False) -> Collection:
        """The index for writing, under its lock. With `repair` (a rebuild), a damaged catalog
        is set aside instead of refused: the rebuild starts over beside it."""
        col = cls(root_dir, name, writer=True)
        try:
            col.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from .atomic import write_error

            raise write_error(col.dir, e) from None
        col._lock()
        try:
            col._open(repair=repair)
        except BaseException:
            col.close()
            raise
        return col

    def _open(self, repair: bool) -> None:
        found_manifest = self._read_manifest()
        recovering = found_manifest is None
        self.manifest = found_manifest or Manifest()
        if recovering:
            found = self._find_catalog()
            if found is None:
                if not self.writer:
                    raise self._not_found()
                self.catalog = Catalog(self.dir / CATALOG)  # a new index
                return
            if found != self.dir:
                self.manifest.data = found.name
        catalog_path = self.data_dir / CATALOG
        if not catalog_path.is_file() and not self.writer and not self.manifest.encoder:
            raise self._empty()
        if not catalog_path.is_file() and self.manifest.encoder:
            if not repair:
                raise IndexFormatError(
                    f"index {self.name!r}: {catalog_path} is missing (it holds the paths and "
                    f"vectors); {rebuild_hint(self.name)}"
                )
            self.catalog = None
            return
        try:
            self.catalog = Catalog(catalog_path, readonly=not self.writer)
            if not self.writer and not self.manifest.encoder and self.catalog.is_blank():
                # The first run was killed before the catalog's schema committed: nothing was
                # ever indexed here (a writer creates the schema and carries on).
                raise self._empty()
            self.catalog.check()
        except (IndexFormatError, sqlite3.DatabaseError) as e:
            if self.catalog is not None:
                self.catalog.close()
                self.catalog = None
            if not repair:
                detail = str(e) if isinstance(e, IndexFormatError) else f"{catalog_path}: {e}"
                raise IndexFormatError(
                    f"index {self.name!r}: {detail}; {rebuild_hint(self.name)}"
                ) from None
            self.damaged.append(catalog_path)
            return
        if recovering:
            self._recover_manifest()
        self._check_generation()

    def _find_catalog(self) -> Path | None:
        """Without a manifest: the directory of the live catalog (the index directory, or the
        newest finished rebuild), or None."""
        if (self.dir / CATALOG).is_file():
            return self.dir
        for path in sorted(self.dir.glob("gen-*/" + CATALOG), reverse=True):
            try:
                cat = Catalog(path, readonly=True)
                try:
                    if cat.get_meta(META_STATE) == "live":
                        return path.parent
                finally:
                    cat.close()
            except sqlite3.DatabaseError:
                continue
        return None

    def _empty(self) -> IndexNotFoundError:
        return IndexNotFoundError(
            f"index {self.name!r} is empty: index some files first (mmsearch index PATH "
            f"--index {self.name})"
        )

    def _not_found(self) -> IndexNotFoundError:
        known = list_indexes(self.root_dir)
        hint = f"; indexes in {self.root_dir}: {', '.join(known)}" if known else ""
        return IndexNotFoundError(
            f"no index named {self.name!r} in {self.root_dir.resolve()} "
            f"(create it with: mmsearch index PATH --index {self.name}){hint}"
        )

    def _recover_manifest(self) -> None:
        """manifest.json is gone or damaged: the catalog says which model its vectors are from."""
        identity = self.catalog.get_identity(META_ENCODER)
        if identity is None:
            if self.catalog.unit_count() == 0:
                return  # nothing was ever committed: a new, empty index
            raise IndexFormatError(
                f"index {self.name!r}: manifest.json is missing or damaged and the catalog does "
                f"not record which model made its vectors; {rebuild_hint(self.name)}"
            )
        data = self.data_dir
        self.manifest = Manifest(name=self.name, encoder=identity)
        if data != self.dir:
            self.manifest.data = data.name
        audio = self.catalog.get_identity(META_AUDIO)
        if audio:
            self.manifest.audio_encoder = audio
        self.notes.append(f"manifest.json was missing or damaged; rebuilt it from {CATALOG}")
        if self.writer:
            self.write_manifest()

    def _check_generation(self) -> None:
        """A catalog behind the generation the manifest last saw lost commits (its WAL was
        deleted, or an older copy was put back): say so; the next index run adds them again."""
        saw = self.manifest.vectors_generation
        have = self.catalog.generation()
        if saw is None or have >= saw:
            return
        held = self.manifest.files
        count = self.catalog.db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        lost = f" ({count} of {held} files remain)" if held is not None else ""
        self.notes.append(
            f"index {self.name!r}: {CATALOG} is missing commits it had{lost} (was its -wal file "
            f"deleted?); run `mmsearch index PATH --index {self.name}` to add the lost files again"
        )
        if self.writer:
            # vectors.faiss reflects the lost commits: never load it for this catalog
            self.write_manifest(vectors_generation=None)

    def _lock(self) -> None:
        fd = open_lock(self.dir / LOCK)
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

    def clone(self) -> Collection:
        """This open index for another thread: the same manifest and loaded vectors, its own
        read-only connection to the catalog (a SQLite connection belongs to the thread that
        opened it). For readers only."""
        if self.writer:
            raise ValueError("only a reader's Collection can be cloned")
        other = copy.copy(self)
        other.catalog = Catalog(self.data_dir / CATALOG, readonly=True)
        other.notes = []
        return other

    def close(self) -> None:
        for cat in {id(c): c for c in (self.catalog, self.salvage, self.live) if c}.values():
            cat.close()
        self.catalog = self.salvage = self.live = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- manifest ---------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """Where the live generation's files are: the index directory, or the subdirectory the
        last rebuild wrote."""
        return self.dir / self.manifest.data

    @property
    def target_dir(self) -> Path:
        """Where this writer puts data files: the generation being built, else the live one."""
        return self.building or self.data_dir

    def _read_manifest(self) -> Manifest | None:
        """The manifest, or None when there is none or it is damaged (then the catalog is asked)."""
        d = Manifest.read(self.dir / MANIFEST)
        if d is None:
            return None
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"index {self.name!r} has format version {version}; this mmsearch reads "
                f"version {FORMAT_VERSION}. {rebuild_hint(self.name).capitalize()}"
            )
        data = d.get("data", ".")
        if data != "." and not (isinstance(data, str) and NAME.match(data)):
            return None  # a data directory outside the index is never followed
        try:
            return Manifest.from_json(d)
        except ValueError:
            return None  # a model identity without its key: damaged

    def write_manifest(self, **updates) -> None:
        self.manifest.update(**updates)
        self.manifest.write(self.dir / MANIFEST)

    @property
    def encoder_identity(self) -> EncoderIdentity | None:
        if self.building is not None:
            return self.new_identity["encoder"]
        return self.manifest.encoder

    @property
    def audio_identity(self) -> EncoderIdentity | None:
        if self.building is not None:
            return self.new_identity.get("audio")
        return self.manifest.audio_encoder

    @property
    def projector_path(self) -> Path:
        return self.target_dir / AUDIO_PROJECTOR

    def set_encoder(self, identity: EncoderIdentity) -> None:
        """Record the model the vectors are made with: in the catalog first, then the manifest."""
        self.catalog.set_identity(META_ENCODER, identity)
        if self.building is None:
            self.write_manifest(encoder=identity, name=self.name)

    def set_audio(self, identity: EncoderIdentity, save_projector) -> None:
        """Save the audio projector (through `save_projector(path)`) and record its identity."""
        save_projector(self.projector_path)
        self.catalog.set_identity(META_AUDIO, identity)
        if self.building is not None:
            self.new_identity["audio"] = identity
        else:
            self.write_manifest(audio_encoder=identity)

    def check_encoder(self, identity: EncoderIdentity) -> None:
        """Refuse to mix vectors of two models in one index."""
        mine = self.encoder_identity
        if mine and mine.key != identity.key:
            raise ModelMismatchError(
                f"index {self.name!r} was built with model {mine.spec} "
                f"(weights {mine.weights}), not {identity.spec} "
                f"(weights {identity.weights}). Use the index's model, or re-embed "
                f"everything with the new one: mmsearch index PATH --index {self.name} "
                f"--model {identity.spec} --rebuild"
            )
