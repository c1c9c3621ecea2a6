"""The catalog's SQLite schema, and how a catalog written by an older mmsearch is brought up to
it: columns added later are added with NULLs by a writer (adding one rewrites nothing), and read
as NULL from one opened read-only."""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path BLOB NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,
    taken REAL,
    phash INTEGER,
    width INTEGER,
    height INTEGER
);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    start REAL,
    end REAL,
    vector BLOB NOT NULL,
    modality TEXT  -- NULL: the file's; else the unit's own (a video's soundtrack: audio)
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
# Columns added to `files` after the first release (FileMeta's fields).
META_COLUMNS = (
    ("taken", "REAL"),
    ("phash", "INTEGER"),
    ("width", "INTEGER"),
    ("height", "INTEGER"),
)


# Every column added after the first release, per table.
ADDED_COLUMNS = {
    "files": META_COLUMNS,
    "units": (("modality", "TEXT"),),  # a unit's own modality (a video's soundtrack: audio)
}


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def migrate(db: sqlite3.Connection) -> None:
    for table, added in ADDED_COLUMNS.items():
        have = _columns(db, table)
        for name, kind in added:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def columns_sql(db: sqlite3.Connection, table: str, alias: str, names: list[str]) -> dict[str, str]:
    """SQL reading each column of `names` from `table` (as `alias`), or NULL where it is absent."""
    have = _columns(db, table)
    return {c: f"{alias}.{c}" if c in have else "NULL" for c in names}
