"""An index's vectors.faiss: read when it reflects the catalog, rebuilt from the catalog when it
does not, restructured (exact <-> IVF, retrained) as the index grows, and described in the manifest.

The catalog holds every vector, so this file is a cache that can always be rebuilt: a reader that
finds its stamp behind the catalog (a run was killed before saving) or the file damaged rebuilds
the same kind of index in memory. A mixin of Collection (storage/collection.py), whose manifest,
catalog, target directory and encoder identity it uses.
"""

from __future__ import annotations

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

VECTORS = "vectors.faiss"


class VectorFileMixin:
    _vectors: VectorIndex | None = None

    @property
    def dim(self) -> int:
        return int(self.encoder_identity.dim)

    @property
    def vectors(self) -> VectorIndex:
        if self._vectors is None:
            self._vectors = self._load_vectors()
        return self._vectors

    def unload_vectors(self) -> None:
        """Forget the loaded vector index (the next use loads or rebuilds it afresh)."""
        self._vectors = None

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
