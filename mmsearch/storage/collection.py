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
"""

from __future__ import annotations

import copy
import fcntl
import os
import re
import secrets
import shutil
import sqlite3
import time
from pathlib import Path

from ..errors import (
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    ModelMismatchError,
    UsageError,
)
from . import calibration
from .atomic import open_lock
from .catalog import Catalog
from .manifest import FORMAT_VERSION, Manifest
from .vectors import (
    EXACT_BELOW,
    RETRAIN_GROWTH,
    TARGET_RECALL,
    VectorIndex,
    choose_type,
    from_catalog,
    is_ivf,
    ivf_encoding,
)

MANIFEST = "manifest.json"
CATALOG = "catalog.sqlite"
VECTORS = "vectors.faiss"
LOCK = "lock"
AUDIO_PROJECTOR = "audio_projector.safetensors"  # the projector the index's audio was embedded with
DATA_FILES = (
    CATALOG, CATALOG + "-wal", CATALOG + "-shm", VECTORS, AUDIO_PROJECTOR, calibration.FILE
)  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# What the catalog records besides its rows (so a lost manifest can be rebuilt from it).
META_ENCODER, META_AUDIO, META_STATE = "encoder", "audio_encoder", "state"


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
    return sorted(
        p.name
        for p in root_dir.iterdir()
        if _NAME.match(p.name) and ((p / MANIFEST).is_file() or (p / CATALOG).is_file())
    )


def model_cache_dir(root_dir: Path, key: str) -> Path:
    """Where derived model artifacts (the torch-free query tower) live, shared by indexes."""
    return Path(root_dir) / ".models" / key


def _rebuild_hint(name: str) -> str:
    return f"rebuild it with: mmsearch index PATH --index {name} --rebuild"


class Collection:
    def __init__(self, root_dir: Path, name: str, writer: bool):
        self.root_dir = Path(root_dir)
        self.name = check_name(name)
        self.dir = self.root_dir / name
        self.writer = writer
        self._lock_fd: int | None = None
        self._vectors: VectorIndex | None = None
        self.manifest = Manifest()
        self.catalog: Catalog | None = None
        # A rebuild in progress: the new generation's directory, and the old catalog it may
        # salvage vectors from (same encoder identity only).
        self.building: Path | None = None
        self.salvage: Catalog | None = None
        self._live: Catalog | None = None
        self._new: dict = {}  # the identities of the generation being built
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
            raise IndexNotFoundError(
                f"index {self.name!r} is empty: index some files first (mmsearch index PATH "
                f"--index {self.name})"
            )
        if not catalog_path.is_file() and self.manifest.encoder:
            if not repair:
                raise IndexFormatError(
                    f"index {self.name!r}: {catalog_path} is missing (it holds the paths and "
                    f"vectors); {_rebuild_hint(self.name)}"
                )
            self.catalog = None
            return
        try:
            self.catalog = Catalog(catalog_path, readonly=not self.writer)
            self.catalog.check()
        except (IndexFormatError, sqlite3.DatabaseError) as e:
            if self.catalog is not None:
                self.catalog.close()
                self.catalog = None
            if not repair:
                detail = str(e) if isinstance(e, IndexFormatError) else f"{catalog_path}: {e}"
                raise IndexFormatError(
                    f"index {self.name!r}: {detail}; {_rebuild_hint(self.name)}"
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

    def _not_found(self) -> IndexNotFoundError:
        known = list_indexes(self.root_dir)
        hint = f"; indexes in {self.root_dir}: {', '.join(known)}" if known else ""
        return IndexNotFoundError(
            f"no index named {self.name!r} in {self.root_dir.resolve()} "
            f"(create it with: mmsearch index PATH --index {self.name}){hint}"
        )

    def _recover_manifest(self) -> None:
        """manifest.json is gone or damaged: the catalog says which model its vectors are from."""
        identity = self.catalog.get_meta(META_ENCODER)
        if identity is None:
            if self.catalog.unit_count() == 0:
                return  # nothing was ever committed: a new, empty index
            raise IndexFormatError(
                f"index {self.name!r}: manifest.json is missing or damaged and the catalog does "
                f"not record which model made its vectors; {_rebuild_hint(self.name)}"
            )
        data = self.data_dir
        self.manifest = Manifest(name=self.name, encoder=identity)
        if data != self.dir:
            self.manifest.data = data.name
        audio = self.catalog.get_meta(META_AUDIO)
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
        for cat in {id(c): c for c in (self.catalog, self.salvage, self._live) if c}.values():
            cat.close()
        self.catalog = self.salvage = self._live = None
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
                f"version {FORMAT_VERSION}. {_rebuild_hint(self.name).capitalize()}"
            )
        data = d.get("data", ".")
        if data != "." and not (isinstance(data, str) and _NAME.match(data)):
            return None  # a data directory outside the index is never followed
        return Manifest.from_json(d)

    def write_manifest(self, **updates) -> None:
        self.manifest.update(**updates)
        self.manifest.write(self.dir / MANIFEST)

    @property
    def encoder_identity(self) -> dict | None:
        if self.building is not None:
            return self._new["encoder"]
        return self.manifest.encoder

    @property
    def audio_identity(self) -> dict | None:
        if self.building is not None:
            return self._new.get("audio")
        return self.manifest.audio_encoder

    @property
    def projector_path(self) -> Path:
        return self.target_dir / AUDIO_PROJECTOR

    def set_encoder(self, identity: dict) -> None:
        """Record the model the vectors are made with: in the catalog first, then the manifest."""
        self.catalog.set_meta(META_ENCODER, identity)
        if self.building is None:
            self.write_manifest(encoder=identity, name=self.name)

    def set_audio(self, identity: dict, save_projector) -> None:
        """Save the audio projector (through `save_projector(path)`) and record its identity."""
        save_projector(self.projector_path)
        self.catalog.set_meta(META_AUDIO, identity)
        if self.building is not None:
            self._new["audio"] = identity
        else:
            self.write_manifest(audio_encoder=identity)

    def check_encoder(self, identity: dict) -> None:
        """Refuse to mix vectors of two models in one index."""
        mine = self.encoder_identity
        if mine and mine.get("key") != identity.get("key"):
            raise ModelMismatchError(
                f"index {self.name!r} was built with model {mine.get('spec')} "
                f"(weights {mine.get('weights')}), not {identity.get('spec')} "
                f"(weights {identity.get('weights')}). Use the index's model, or re-embed "
                f"everything with the new one: mmsearch index PATH --index {self.name} "
                f"--model {identity.get('spec')} --rebuild"
            )

    # --- generations --------------------------------------------------------------------------
    def begin_generation(self, identity: dict, audio: dict | None = None) -> None:
        """Start (or resume) a rebuild beside the live generation. The catalog being written is
        the new one; the live one stays open as `salvage` when its vectors are from the same
        model (so intact vectors are copied, not embedded again)."""
        pending = self.manifest.pending
        resumed = None
        if pending and (self.dir / pending / CATALOG).is_file():
            try:
                cat = Catalog(self.dir / pending / CATALOG)
                cat.check()
                same = (cat.get_meta(META_ENCODER) or {}).get("key") == identity.get("key")
                if audio is not None:  # align-audio: the same new projector too
                    same = same and (cat.get_meta(META_AUDIO) or {}).get("key") == audio["key"]
                if same:
                    resumed = cat
                else:
                    cat.close()
            except (IndexFormatError, sqlite3.DatabaseError):
                pass
        if resumed is None:
            self.discard_pending()
            pending = f"gen-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
            (self.dir / pending).mkdir()
            self.write_manifest(pending=pending)
            resumed = Catalog(self.dir / pending / CATALOG)
            resumed.set_meta(META_ENCODER, identity)
            if audio:
                resumed.set_meta(META_AUDIO, audio)
            resumed.set_meta(META_STATE, "building")
        else:
            self.notes.append("resumed an unfinished rebuild")
        self._live = self.catalog
        live_identity = self.manifest.encoder or {}
        if self.catalog is not None and live_identity.get("key") == identity.get("key"):
            self.salvage = self.catalog
        self.catalog = resumed
        self.building = self.dir / pending
        self._new = {"encoder": identity, "audio": resumed.get_meta(META_AUDIO)}
        self._vectors = None

    def discard_pending(self) -> None:
        """Drop an unfinished rebuild's directory (a plain run works on the live generation)."""
        pending = self.manifest.pending
        if not pending:
            return
        shutil.rmtree(self.dir / pending, ignore_errors=True)
        self.write_manifest(pending=None)
        self.notes.append("discarded an unfinished rebuild")

    def finish_generation(self, options=None, progress=None) -> None:
        """Make the generation being built the live one: its vectors saved, then the manifest
        switched in one atomic replace, then the old generation's files removed (damaged ones
        are kept aside, under the names the run reports)."""
        new = self.building
        self.vectors  # noqa: B018 - loaded (from the new catalog) if this run had not yet
        self.save_vectors(options, progress)
        self.catalog.set_meta(META_STATE, "live")
        choice = self.manifest.vector_index.choice
        choice = getattr(options, "index_type", None) or choice
        old_dir = self.data_dir
        identity = self.catalog.get_meta(META_ENCODER)
        audio = self.catalog.get_meta(META_AUDIO)
        self.building = None
        self.manifest.audio_encoder = None
        self.write_manifest(
            data=new.name, pending=None, encoder=identity, name=self.name,
            **({"audio_encoder": audio} if audio else {}), **self._vector_fields(choice),
        )  # fmt: skip
        for cat in (self._live, self.salvage):
            if cat is not None:
                cat.close()
        self._live = self.salvage = None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in DATA_FILES:
            path = old_dir / name
            if path in self.damaged and path.exists():
                aside = path.with_name(f"{name}.damaged-{stamp}")
                os.replace(path, aside)
                self.notes.append(f"{path} was damaged; kept it aside as {aside}")
            else:
                path.unlink(missing_ok=True)
        if old_dir != self.dir and not any(old_dir.iterdir()):
            old_dir.rmdir()

    # --- vectors ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.encoder_identity["dim"])

    @property
    def vectors(self) -> VectorIndex:
        if self._vectors is None:
            self._vectors = self._load_vectors()
        return self._vectors

    def _load_vectors(self) -> VectorIndex:
        """vectors.faiss if it reflects the catalog, else the same kind of index rebuilt from the
        catalog in memory (a run was killed before saving, or the file is damaged)."""
        path = self.target_dir / VECTORS
        index_type = self.manifest.index_type
        info = self.manifest.vector_index
        generation = self.catalog.generation()
        stamped = self.manifest.vectors_generation == generation and self.building is None
        if path.is_file() and stamped:
            try:
                # Readers map the file instead of reading it (a cold search opens it in
                # milliseconds); writers need it in memory to add and remove vectors.
                vi = VectorIndex.load(path, self.dim, mmap=not self.writer, index_type=index_type)
                # An older copy of the file put back passes the stamp: count its vectors too.
                if vi.index_type == index_type and vi.ntotal == self.catalog.unit_count():
                    vi.trained_on, vi.recall = info.trained_on, info.recall_at_10
                    return vi
                self.notes.append(f"{path} does not match the catalog; rebuilt it from the catalog")
            except (RuntimeError, ValueError):
                self.notes.append(f"{path} is damaged; rebuilt it from the catalog")
        return self._rebuild_vectors(index_type, True, info.trained_on)

    def _rebuild_vectors(
        self, index_type: str, reuse_training: bool = False, trained_on=None, progress=None
    ) -> VectorIndex:
        """An index of `index_type` over every vector in the catalog (`vectors.from_catalog`);
        with `reuse_training`, an IVF index keeps the training of the vectors.faiss on disk when
        that one is of the same type (after a crash or damage its lists are out of date, not its
        centroids)."""
        trained = self._trained_like(index_type) if reuse_training else None
        return from_catalog(self.catalog, self.dim, index_type, trained, trained_on, progress)

    def _trained_like(self, index_type: str) -> VectorIndex | None:
        """The vectors.faiss on disk if it is a trained index of that type (its lists are out of
        date, its training is not)."""
        path = self.target_dir / VECTORS
        if not path.is_file():
            return None
        try:
            vi = VectorIndex.load(path, self.dim)
        except (RuntimeError, ValueError):
            return None
        return vi if vi.index_type == index_type and vi.is_trained else None

    def save_vectors(self, options=None, progress=None) -> None:
        """Write vectors.faiss, stamped with the catalog generation it reflects.

        With `options` (an IndexOptions: index_type, exact_below, vector_memory) the kind of index
        is chosen afresh first: exact below the threshold, IVF above it, retrained once the index
        has grown RETRAIN_GROWTH-fold since its training. Without, the index is saved as it is
        (what a failed run does: no minutes of training on the way out)."""
        if self._vectors is None:
            return
        choice = self.manifest.vector_index.choice
        if options is not None:
            choice = getattr(options, "index_type", None) or choice
            self._restructure(options, choice, progress)
        vi = self._vectors
        vi.save(self.target_dir / VECTORS)
        if self.building is None:
            self.write_manifest(**self._vector_fields(choice))

    def _vector_fields(self, choice: str) -> dict:
        """What the manifest says of the vector file: its kind, tuning and catalog stamp."""
        vi = self._vectors
        info = {"choice": choice}
        if not vi.exact:
            info.update(
                nlist=vi.nlist,
                nprobe=vi.nprobe,
                recall_at_10=vi.recall,
                recall_at_10_shifted=vi.recall_shifted,
                recall_target=TARGET_RECALL,
                trained_on=vi.trained_on,
            )
        return dict(
            vectors_generation=self.catalog.generation(),
            index_type=vi.index_type,
            vectors=vi.ntotal,
            files=self.catalog.db.execute("SELECT COUNT(*) FROM files").fetchone()[0],
            vector_index=info,
        )

    def _restructure(self, options, choice: str, progress) -> None:
        vi = self._vectors
        n = vi.ntotal
        want = choose_type(
            n,
            self.dim,
            choice,
            getattr(options, "exact_below", EXACT_BELOW),
            getattr(options, "vector_memory", None),
        )
        have = vi.index_type
        if is_ivf(want) and is_ivf(have):
            grown = vi.trained_on is not None and n >= RETRAIN_GROWTH * vi.trained_on
            if ivf_encoding(want) == ivf_encoding(have) and not grown:
                return
        elif want == have:
            return
        self._vectors = None  # freed before the new one is built
        self._vectors = self._rebuild_vectors(want, progress=progress)
