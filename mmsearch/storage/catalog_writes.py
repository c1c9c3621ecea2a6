"""What a writer changes in the catalog: files, their units (with vectors) and failures. A mixin
of Catalog (storage/catalog.py); every call runs inside the caller's `Catalog.transaction`, which
commits it as one generation."""

from __future__ import annotations

import time

import numpy as np

from ..records import FileEntry, FileMeta, Segment


class CatalogWrites:
    def add_file(self, entry: FileEntry, digest: str, meta: FileMeta | None = None) -> int:
        m = meta or FileMeta()
        cur = self.db.execute(
            "INSERT INTO files(path, modality, size, mtime_ns, hash, taken, phash, width, height) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (entry.path, entry.modality, entry.size, entry.mtime_ns, digest, *m.values()),
        )
        return cur.lastrowid

    def update_file(
        self, file_id: int, entry: FileEntry, digest: str, meta: FileMeta | None = None
    ) -> None:
        """A file's new stat and hash; its FileMeta too when given (else it is kept: the
        content did not change)."""
        self.db.execute(
            "UPDATE files SET path=?, modality=?, size=?, mtime_ns=?, hash=? WHERE id=?",
            (entry.path, entry.modality, entry.size, entry.mtime_ns, digest, file_id),
        )
        if meta is not None:
            self.db.execute(
                "UPDATE files SET taken=?, phash=?, width=?, height=? WHERE id=?",
                (*meta.values(), file_id),
            )

    def delete_file(self, file_id: int) -> list[int]:
        ids = self.unit_ids_of(file_id)
        self.db.execute("DELETE FROM units WHERE file_id = ?", (file_id,))
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return ids

    def replace_units(
        self, file_id: int, segments: list[Segment], vectors: np.ndarray
    ) -> tuple[list[int], list[int]]:
        """Drop the file's old units and store new ones; returns (removed ids, added ids)."""
        old = self.unit_ids_of(file_id)
        self.db.execute("DELETE FROM units WHERE file_id = ?", (file_id,))
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        new = []
        for seg, vec in zip(segments, vectors, strict=True):
            cur = self.db.execute(
                "INSERT INTO units(file_id, start, end, vector, modality) VALUES (?,?,?,?,?)",
                (file_id, seg.start, seg.end, vec.tobytes(), seg.modality),
            )
            new.append(cur.lastrowid)
        return old, new

    def record_failure(self, entry: FileEntry, reason: str, retry: bool = False) -> None:
        """A file that could not be indexed. It is retried once it changes, or with `retry` on
        every run (its model was missing: nothing wrong with the file)."""
        size, mtime = (None, None) if retry else (entry.size, entry.mtime_ns)
        self.db.execute(
            "INSERT OR REPLACE INTO failures(path, modality, size, mtime_ns, reason, time) "
            "VALUES (?,?,?,?,?,?)",
            (entry.path, entry.modality, size, mtime, reason, time.time()),
        )

    def copy_failures(self, rows: list[tuple]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO failures(path, modality, size, mtime_ns, reason, time) "
            "VALUES (?,?,?,?,?,?)",
            rows,
        )

    def clear_failure(self, path: bytes) -> None:
        self.db.execute("DELETE FROM failures WHERE path = ?", (path,))

    def clear(self) -> None:
        self.db.execute("DELETE FROM units")
        self.db.execute("DELETE FROM files")
        self.db.execute("DELETE FROM failures")
