"""The catalog: one SQLite database per index holding files, their embedded units (with vectors)
and failures. SQLite unit ids are the FAISS ids; the vectors kept here are the source of truth the
FAISS file is rebuilt from after a crash."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IndexFormatError, IndexWriteError
from ..records import FileEntry, Segment

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path BLOB NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    start REAL,
    end REAL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS units_file ON units(file_id);
CREATE TABLE IF NOT EXISTS failures (
    path BLOB PRIMARY KEY,
    modality TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    reason TEXT NOT NULL,
    time REAL NOT NULL
);
"""


@dataclass(frozen=True)
class FileRow:
    id: int
    path: bytes
    modality: str
    size: int
    mtime_ns: int
    hash: str


@dataclass(frozen=True)
class UnitRow:
    id: int
    path: bytes
    modality: str
    start: float | None
    end: float | None


def _prefix_clause(roots: list[bytes]) -> tuple[str, list]:
    """SQL matching paths equal to or below any root (BLOB comparison is bytewise)."""
    parts, args = [], []
    for r in roots:
        base = r.rstrip(b"/")
        parts.append("(path = ? OR (path >= ? AND path < ?))")
        args += [r, base + b"/", base + b"0"]  # '0' is the byte after '/'
    return " OR ".join(parts) or "0", args


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes the database. Where the directory is writable it sees the
    latest commit, WAL included (SQLite keeps its -shm/-wal files there). On a read-only mount,
    or for a user who may not write the directory, SQLite cannot create those files and a plain
    read-only open fails: if no WAL holds commits the main file is the whole catalog, and it is
    opened as immutable (sqlite.org/wal.html, "Read-Only Databases")."""
    import os
    from urllib.parse import quote

    from ..errors import IndexFormatError

    try:  # an unreadable file: PermissionError naming it, not SQLite's "unable to open"
        open(path, "rb").close()
    except FileNotFoundError:
        pass  # SQLite says so below, as before
    uri = "file:" + quote(os.fsencode(Path(path).absolute()))
    try:
        return _probe(sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None))
    except sqlite3.OperationalError:
        wal = Path(str(path) + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise IndexFormatError(
                f"{path} has commits in {wal.name} that cannot be read without write access to "
                f"{path.parent} (SQLite needs to create {path.name}-shm there); open the index "
                "once where it is writable (any mmsearch index run), or copy it"
            ) from None
    return _probe(sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None))


def _probe(db: sqlite3.Connection) -> sqlite3.Connection:
    """SQLite opens lazily: read the schema now, so a failure shows up here."""
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        db.close()
        raise
    return db


class Catalog:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = _open_readonly(self.path)
        else:
            self.db = sqlite3.connect(str(self.path), isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self.db.close()

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

    def unit_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM units").fetchone()[0]

    # --- reading --------------------------------------------------------------------------
    def files_under(self, roots: list[bytes]) -> dict[bytes, FileRow]:
        where, args = _prefix_clause(roots)
        rows = self.db.execute(
            f"SELECT id, path, modality, size, mtime_ns, hash FROM files WHERE {where}", args
        )
        return {r[1]: FileRow(*r) for r in rows}

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
            "SELECT start, end, vector FROM units WHERE file_id = ? ORDER BY id", (file_id,)
        )
        return [(Segment(s, e), np.frombuffer(v, dtype=np.float32)) for s, e, v in rows]

    def unit_ids_of(self, file_id: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM units WHERE file_id = ?", (file_id,))]

    def all_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.db.execute("SELECT id, vector FROM units ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, dim)
        return ids, vecs

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
        rows = self.db.execute(
            "SELECT u.id, f.path, f.modality, u.start, u.end FROM units u "
            f"JOIN files f ON f.id = u.file_id WHERE u.id IN ({marks})",
            ids,
        )
        return {r[0]: UnitRow(*r) for r in rows}

    def unit_ids_with_modality(self, modality: str) -> np.ndarray:
        rows = self.db.execute(
            "SELECT u.id FROM units u JOIN files f ON f.id = u.file_id WHERE f.modality = ?",
            (modality,),
        ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def unit_ids_by_modality(self) -> dict[str, np.ndarray]:
        """Every unit id, grouped by its file's modality (one pass over the table)."""
        rows = self.db.execute(
            "SELECT f.modality, u.id FROM units u JOIN files f ON f.id = u.file_id"
        ).fetchall()
        if not rows:
            return {}
        mods = np.array([r[0] for r in rows])
        ids = np.fromiter((r[1] for r in rows), np.int64, count=len(rows))
        return {str(m): ids[mods == m] for m in np.unique(mods)}

    def counts(self) -> dict:
        files = dict(self.db.execute("SELECT modality, COUNT(*) FROM files GROUP BY modality"))
        units = dict(
            self.db.execute(
                "SELECT f.modality, COUNT(*) FROM units u JOIN files f ON f.id = u.file_id "
                "GROUP BY f.modality"
            )
        )
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
    def add_file(self, entry: FileEntry, digest: str) -> int:
        cur = self.db.execute(
            "INSERT INTO files(path, modality, size, mtime_ns, hash) VALUES (?,?,?,?,?)",
            (entry.path, entry.modality, entry.size, entry.mtime_ns, digest),
        )
        return cur.lastrowid

    def update_file(self, file_id: int, entry: FileEntry, digest: str) -> None:
        self.db.execute(
            "UPDATE files SET path=?, modality=?, size=?, mtime_ns=?, hash=? WHERE id=?",
            (entry.path, entry.modality, entry.size, entry.mtime_ns, digest, file_id),
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
                "INSERT INTO units(file_id, start, end, vector) VALUES (?,?,?,?)",
                (file_id, seg.start, seg.end, vec.tobytes()),
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

    def copy_file(self, source: Catalog, row: FileRow) -> tuple[list[int], np.ndarray]:
        """Carry a file and its units over from another catalog of the same model (a rebuild
        salvaging what is intact); returns the new unit ids and their vectors."""
        units = source.units_of(row.id)
        entry = FileEntry(row.path, row.modality, row.size, row.mtime_ns)
        file_id = self.add_file(entry, row.hash)
        vecs = np.stack([v for _, v in units]) if units else np.zeros((0, 0), np.float32)
        _, new = self.replace_units(file_id, [s for s, _ in units], vecs)
        return new, vecs

    def all_failures(self) -> list[tuple]:
        return list(
            self.db.execute("SELECT path, modality, size, mtime_ns, reason, time FROM failures")
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
