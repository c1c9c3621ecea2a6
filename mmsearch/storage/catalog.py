"""The catalog: one SQLite database per index holding files, their embedded units (with vectors)
and failures. SQLite unit ids are the FAISS ids; the vectors kept here are the source of truth the
FAISS file is rebuilt from after a crash."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..encoders.base import EncoderIdentity
from ..errors import IndexFormatError, IndexWriteError
from ..filters import FileFilter
from ..modalities import TABLE
from ..records import FileEntry, FileMeta, Segment
from .catalog_writes import CatalogWrites
from .readonly import open_readonly
from .schema import META_COLUMNS, SCHEMA, columns_sql, migrate

_UNITS = "FROM units u JOIN files f ON f.id = u.file_id"  # each unit with its file's row


@dataclass(frozen=True)
class FileRow:
    id: int
    path: bytes
    modality: str
    size: int
    mtime_ns: int
    hash: str
    # a photo indexed by an mmsearch that did not record FileMeta: read again (not embedded)
    needs_meta: bool = False


@dataclass(frozen=True)
class UnitRow:
    id: int
    path: bytes
    modality: str
    start: float | None
    end: float | None
    size: int | None = None  # the file's, as indexed
    mtime_ns: int | None = None


def _prefix_clause(roots: list[bytes]) -> tuple[str, list]:
    """SQL matching paths equal to or below any root (BLOB comparison is bytewise)."""
    parts, args = [], []
    for r in roots:
        base = r.rstrip(b"/")
        parts.append("(path = ? OR (path >= ? AND path < ?))")
        args += [r, base + b"/", base + b"0"]  # '0' is the byte after '/'
    return " OR ".join(parts) or "0", args


class Catalog(CatalogWrites):
    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = open_readonly(self.path)
        else:
            self.db = sqlite3.connect(str(self.path), isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            migrate(self.db)
        self.db.execute("PRAGMA foreign_keys=ON")
        # What reads a later column says where an older catalog (opened read-only) lacks it.
        self.meta_sql = columns_sql(self.db, "files", "f", [c for c, _ in META_COLUMNS])
        self._own_modality = columns_sql(self.db, "units", "u", ["modality"])["modality"]

    @property
    def _unit_modality(self) -> str:
        return f"COALESCE({self._own_modality}, f.modality)"

    def close(self) -> None:
        self.db.close()

    def is_blank(self) -> bool:
        """No table: killed before its schema committed (SQLite makes the file first)."""
        return self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0

    def check(self) -> None:
        """Read the catalog's header and tables once: damage shows up here, as IndexFormatError
        naming the file, not later as a raw SQLite error in the middle of a command."""
        try:
            self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
            self.db.execute("SELECT id FROM files LIMIT 1").fetchone()
            self.db.execute("SELECT id FROM units LIMIT 1").fetchone()
            self.db.execute("SELECT path FROM failures LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexFormatError(f"{self.path} is damaged ({e})") from None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One commit; the generation counter moves with it. A full disk or a read-only file is
        an IndexWriteError and the catalog stays as of its last commit."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._write_error(e) from None
        try:
            yield
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES('generation', '1') ON CONFLICT(key) "
                "DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )
            self.db.execute("COMMIT")
        except BaseException as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise self._write_error(e) from None
            raise

    def _write_error(self, e: sqlite3.Error) -> IndexWriteError:
        text = str(e)
        if "full" in text:
            return IndexWriteError(
                f"disk full while writing {self.path}; the index is kept as of its last commit. "
                "Free some space and run the command again"
            )
        return IndexWriteError(f"cannot write {self.path}: {text}")

    # --- metadata -------------------------------------------------------------------------
    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def get_meta(self, key: str):
        """A JSON value stored with the catalog (the encoder identity, ...), or None."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value) -> None:
        """Stored in its own commit: what the catalog's vectors are depends on it."""
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    def get_identity(self, key: str) -> EncoderIdentity | None:
        """The model identity stored as meta `key` (layout.META_ENCODER, META_AUDIO), or None."""
        value = self.get_meta(key)
        return EncoderIdentity.from_dict(value) if value else None

    def set_identity(self, key: str, identity: EncoderIdentity) -> None:
        self.set_meta(key, identity.to_dict())

    def unit_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM units").fetchone()[0]

    # --- reading --------------------------------------------------------------------------
    def files_under(self, roots: list[bytes]) -> dict[bytes, FileRow]:
        where, args = _prefix_clause(roots)
        hashed = ",".join(f"'{m.name}'" for m in TABLE if m.duplicate_hash)
        rows = self.db.execute(
            f"SELECT id, path, modality, size, mtime_ns, hash, "
            f"({self.meta_sql['phash']} IS NULL AND modality IN ({hashed})) "
            f"FROM files f WHERE {where}",
            args,
        )
        return {r[1]: FileRow(*r[:6], bool(r[6])) for r in rows}

    def failures_under(self, roots: list[bytes]) -> dict[bytes, tuple[int, int]]:
        where, args = _prefix_clause(roots)
        rows = self.db.execute(f"SELECT path, size, mtime_ns FROM failures WHERE {where}", args)
        return {r[0]: (r[1], r[2]) for r in rows}

    def file_with_hash(self, digest: str, modality: str) -> FileRow | None:
        row = self.db.execute(
            "SELECT id, path, modality, size, mtime_ns, hash FROM files "
            "WHERE hash = ? AND modality = ? LIMIT 1",
            (digest, modality),
        ).fetchone()
        return FileRow(*row) if row else None

    def units_of(self, file_id: int) -> list[tuple[Segment, np.ndarray]]:
        rows = self.db.execute(
            f"SELECT start, end, vector, {self._own_modality} FROM units u WHERE file_id = ? "
            "ORDER BY id",
            (file_id,),
        )
        return [
            (Segment(s, e, modality=m), np.frombuffer(v, dtype=np.float32)) for s, e, v, m in rows
        ]

    def unit_ids_of(self, file_id: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM units WHERE file_id = ?", (file_id,))]

    def unit_ids(self) -> np.ndarray:
        return np.fromiter(
            (r[0] for r in self.db.execute("SELECT id FROM units ORDER BY id")), np.int64
        )

    def vectors_of(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """The vectors of units `ids`, in that order."""
        out = np.empty((len(ids), dim), np.float32)
        row_of = {int(i): j for j, i in enumerate(ids)}
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            part = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(part))
            query = f"SELECT id, vector FROM units WHERE id IN ({marks})"
            for uid, blob in self.db.execute(query, part):
                out[row_of[uid]] = np.frombuffer(blob, np.float32)
        return out

    def vector_batches(
        self, dim: int, size: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, vectors) in id order, `size` at a time (never the whole table in memory)."""
        cursor = self.db.execute("SELECT id, vector FROM units ORDER BY id")
        while rows := cursor.fetchmany(size):
            ids = np.fromiter((r[0] for r in rows), np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(-1, dim)
            yield ids, vecs

    def units(self, ids: Iterable[int]) -> dict[int, UnitRow]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        sql = f"SELECT u.id, f.path, {self._unit_modality}, u.start, u.end, f.size, f.mtime_ns"
        rows = self.db.execute(f"{sql} {_UNITS} WHERE u.id IN ({marks})", ids)
        return {r[0]: UnitRow(*r) for r in rows}

    def unit_ids_matching(
        self, modality: str | None = None, flt: FileFilter | None = None
    ) -> np.ndarray:
        """Ids of the units of files of `modality` (None: any) that pass the filter `flt`."""
        where, args = flt.where(self.taken_sql) if flt else ("1", [])
        if modality is not None:
            where, args = f"({where}) AND {self._unit_modality} = ?", [*args, modality]
        return self._unit_ids(where, args)

    def units_by_modality(self) -> dict[str, int]:
        """How many units each modality has (modalities without any left out)."""
        return dict(self.db.execute(f"SELECT {self._unit_modality}, COUNT(*) {_UNITS} GROUP BY 1"))

    def unit_ids_of_content(self, path: bytes, digest: str) -> np.ndarray:
        """Ids of the units of the file at `path` and of its byte-identical copies (hash `digest`)."""
        return self._unit_ids("f.path = ? OR f.hash = ?", [path, digest])

    def _unit_ids(self, where: str, args: list) -> np.ndarray:
        sql = f"SELECT u.id {_UNITS} WHERE {where}"
        return np.fromiter((r[0] for r in self.db.execute(sql, args)), np.int64)

    def file_vectors(self, dim: int, modality: str | None = None) -> tuple[list[tuple], np.ndarray]:
        """Per file of `modality` (None: all), in id order: (path, modality, size, width,
        height, phash), and the normalised mean of its units' vectors (one snapshot)."""
        where, args = ("f.modality = ?", [modality]) if modality else ("1", [])
        m = self.meta_sql
        self.db.execute("BEGIN")
        try:
            files = self.db.execute(
                f"SELECT f.id, f.path, f.modality, f.size, {m['width']}, {m['height']}, "
                f"{m['phash']} FROM files f WHERE {where} ORDER BY f.id", args
            ).fetchall()  # fmt: skip
            ids = np.fromiter((r[0] for r in files), np.int64, len(files))
            out = np.zeros((len(files), dim), np.float32)
            cursor = self.db.execute(
                "SELECT u.file_id, u.vector FROM units u JOIN files f ON f.id = u.file_id "
                f"WHERE {where} ORDER BY u.file_id", args
            )  # fmt: skip
            while rows := cursor.fetchmany(65536):
                owner = np.fromiter((r[0] for r in rows), np.int64, len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(-1, dim)
                starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
                out[np.searchsorted(ids, owner[starts])] += np.add.reduceat(vecs, starts)
        finally:
            self.db.execute("COMMIT")
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return [r[1:] for r in files], out

    @property
    def taken_sql(self) -> str:
        """SQL for when a file was taken: its EXIF date where one was read, else its mtime."""
        return f"COALESCE({self.meta_sql['taken']}, f.mtime_ns / 1e9)"

    # --- by content hash: how a server names a file to clients, never by its path -------------
    def hashes_of(self, paths: list[bytes]) -> dict[bytes, str]:
        """The content hash of each of `paths` the catalog holds."""
        out: dict[bytes, str] = {}
        for start in range(0, len(paths), 500):  # SQLite's bound-parameter limit
            part = paths[start : start + 500]
            marks = ",".join("?" * len(part))
            out.update(
                self.db.execute(f"SELECT path, hash FROM files WHERE path IN ({marks})", part)
            )
        return out

    def files_with_hash(self, digest: str) -> list[tuple[bytes, str]]:
        """(path, modality) of every file with that content (copies share it), oldest first."""
        rows = self.db.execute(
            "SELECT path, modality FROM files WHERE hash = ? ORDER BY id", (digest,)
        )
        return [(bytes(path), modality) for path, modality in rows]

    def vectors_with_hash(self, digest: str, start: float | None = None) -> list[np.ndarray]:
        """The vectors of the (first) file with that content, or of its unit starting at
        `start` (a note's first line, a recording's second)."""
        query = (
            "SELECT vector FROM units WHERE file_id = (SELECT MIN(id) FROM files WHERE hash = ?)"
        )
        args: list = [digest]
        if start is not None:  # as a hit gives it: rounded to 3 decimals
            query += " AND abs(start - ?) < 0.0005"
            args.append(start)
        rows = self.db.execute(query + " ORDER BY id", args)
        return [np.frombuffer(v, np.float32) for (v,) in rows]

    def modality_with_hash(self, digest: str) -> str | None:
        """The modality of the (first) file with that content."""
        q = "SELECT modality FROM files WHERE hash = ? ORDER BY id LIMIT 1"
        return next((m for (m,) in self.db.execute(q, (digest,))), None)

    def counts(self) -> dict:
        files = dict(self.db.execute("SELECT modality, COUNT(*) FROM files GROUP BY modality"))
        units = dict(self.db.execute(f"SELECT f.modality, COUNT(*) {_UNITS} GROUP BY f.modality"))
        failures = self.db.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
        return {
            "files": sum(files.values()),
            "vectors": sum(units.values()),
            "failures": failures,
            "by_modality": {m: {"files": files[m], "vectors": units.get(m, 0)} for m in files},
        }

    def failures(self) -> list[tuple[bytes, str, str | None]]:
        return list(self.db.execute("SELECT path, reason, modality FROM failures ORDER BY path"))

    # --- writing (inside transaction()) -------------------------------------------------
    def file_meta(self, file_id: int) -> FileMeta:
        cols = ", ".join(self.meta_sql.values())
        row = self.db.execute(f"SELECT {cols} FROM files f WHERE f.id = ?", (file_id,)).fetchone()
        return FileMeta(*row) if row else FileMeta()

    def copy_file(self, source: Catalog, row: FileRow) -> tuple[list[int], np.ndarray]:
        """Carry a file and its units over from another catalog of the same model (a rebuild
        salvaging what is intact); returns the new unit ids and their vectors."""
        units = source.units_of(row.id)
        entry = FileEntry(row.path, row.modality, row.size, row.mtime_ns)
        file_id = self.add_file(entry, row.hash, source.file_meta(row.id))
        vecs = np.stack([v for _, v in units]) if units else np.zeros((0, 0), np.float32)
        _, new = self.replace_units(file_id, [s for s, _ in units], vecs)
        return new, vecs

    def all_failures(self) -> list[tuple]:
        return list(
            self.db.execute("SELECT path, modality, size, mtime_ns, reason, time FROM failures")
        )
