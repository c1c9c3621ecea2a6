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
from .index import (
    EXACT_BELOW,
    FLAT,
    RETRAIN_GROWTH,
    TARGET_RECALL,
    TRAIN_POINTS_PER_LIST,
    VectorIndex,
    build_ivf,
    choose_type,
    is_ivf,
    ivf_encoding,
    ivf_lists,
    tuning_sample,
)
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
        """vectors.faiss if it reflects the catalog, else the same kind of index rebuilt from the
        catalog in memory (a run was killed before saving, or the file is damaged)."""
        path = self.dir / VECTORS
        index_type = self.manifest.get("index_type", FLAT)
        info = self.manifest.get("vector_index") or {}
        generation = self.catalog.generation()
        if path.is_file() and self.manifest.get("vectors_generation") == generation:
            try:
                # Readers map the file instead of reading it (a cold search opens it in
                # milliseconds); writers need it in memory to add and remove vectors.
                vi = VectorIndex.load(path, self.dim, mmap=not self.writer, index_type=index_type)
                if vi.index_type == index_type:
                    vi.trained_on, vi.recall = info.get("trained_on"), info.get("recall_at_10")
                    return vi
            except (RuntimeError, ValueError):
                pass  # damaged file: rebuilt from the catalog below
        return self._rebuild_vectors(index_type, True, info.get("trained_on"))

    def _rebuild_vectors(
        self, index_type: str, reuse_training: bool = False, trained_on=None, progress=None
    ) -> VectorIndex:
        """An index of `index_type` over every vector in the catalog, read in batches (at tens of
        millions of vectors the catalog's vectors are never all in memory besides the index).

        An IVF index is trained on a sample of the catalog, or with `reuse_training` keeps the
        training of the vectors.faiss on disk when that one is of the same type (after a crash or
        damage: the file's lists are out of date, not its centroids), and its
        nprobe is tuned on held-out catalog vectors against an exact scan made in the same pass."""
        db = self.catalog.db
        db.execute("BEGIN")  # one snapshot for the sample and the full pass
        try:
            ids = self.catalog.unit_ids()
            n = len(ids)
            if is_ivf(index_type) and ivf_lists(n) == 0:
                index_type = FLAT  # too few vectors to train lists on
            if not is_ivf(index_type):
                vi = VectorIndex(self.dim)
                for batch_ids, vecs in self.catalog.vector_batches(self.dim):
                    vi.add(batch_ids, vecs)
                return vi
            trained = self._trained_like(index_type) if reuse_training else None
            nlist = int(index_type[3:].partition(",")[0])
            if trained is None and TRAIN_POINTS_PER_LIST * nlist > n:
                index_type = f"IVF{ivf_lists(n)},{ivf_encoding(index_type)}"
                nlist = ivf_lists(n)
            query_rows, train_rows = tuning_sample(n, nlist)
            query_ids = ids[query_rows]
            train = (
                None if trained is not None else self.catalog.vectors_of(ids[train_rows], self.dim)
            )
            vi = build_ivf(
                index_type,
                self.dim,
                self.catalog.vector_batches(self.dim),
                (query_ids, self.catalog.vectors_of(query_ids, self.dim)),
                train=train,
                trained=trained,
                n=n,
                progress=progress,
            )
            if trained is not None:
                vi.trained_on = trained_on or n
            return vi
        finally:
            db.execute("COMMIT")

    def _trained_like(self, index_type: str) -> VectorIndex | None:
        """The vectors.faiss on disk if it is a trained index of that type (its lists are out of
        date, its training is not)."""
        path = self.dir / VECTORS
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
        choice = (self.manifest.get("vector_index") or {}).get("choice", "auto")
        if options is not None:
            choice = getattr(options, "index_type", None) or choice
            self._restructure(options, choice, progress)
        vi = self._vectors
        vi.save(self.dir / VECTORS)
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
        self.write_manifest(
            vectors_generation=self.catalog.generation(),
            index_type=vi.index_type,
            vectors=vi.ntotal,
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
