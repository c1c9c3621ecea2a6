"""Opening a catalog for reading without ever writing it, also where its folder is read-only."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from ..errors import IndexFormatError


def open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes the database. Where the directory is writable it sees the
    latest commit, WAL included (SQLite keeps its -shm/-wal files there). On a read-only mount,
    or for a user who may not write the directory, SQLite cannot create those files and a plain
    read-only open fails: if no WAL holds commits the main file is the whole catalog, and it is
    opened as immutable (sqlite.org/wal.html, "Read-Only Databases")."""
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
