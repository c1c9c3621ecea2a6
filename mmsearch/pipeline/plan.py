"""Which files to embed again, and why: the plan of one run from the catalog and the walk."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ..errors import UsageError
from ..records import MODALITIES, FileEntry
from ..storage.catalog import FileRow
from ..storage.collection import Collection


@dataclass
class Plan:
    todo: list[tuple[FileEntry, FileRow | None]]  # new or changed files, with their old row
    unchanged: int
    vanished: dict[bytes, FileRow]  # indexed files under the roots that are gone
    vanished_failures: list[bytes]
    # A rebuild's files whose vectors the old generation holds for the same model and the same
    # size and mtime: copied over without being read.
    carry: list[FileRow] = field(default_factory=list)

    @cached_property
    def old_rows(self) -> dict[bytes, FileRow | None]:
        """Each file to embed's previous row, by path (built once, read by every chunk)."""
        return {e.path: row for e, row in self.todo}


def check_types(types) -> frozenset[str]:
    """The modalities a run indexes (--types); all of them by default."""
    if not types:
        return frozenset(MODALITIES)
    unknown = [t for t in types if t not in MODALITIES]
    if unknown:
        raise UsageError(
            f"unknown type {', '.join(map(repr, unknown))} in --types; use {', '.join(MODALITIES)}"
        )
    return frozenset(types)


def plan(
    col: Collection,
    entries: list[FileEntry],
    roots: list[bytes],
    types: frozenset[str] = frozenset(MODALITIES),
) -> Plan:
    """What a run does with the files under `roots` of the `types` it indexes (files of other
    types are left as they are, indexed or not)."""
    known = {p: r for p, r in col.catalog.files_under(roots).items() if r.modality in types}
    failing = col.catalog.failures_under(roots)
    salvage = col.salvage.files_under(roots) if col.salvage is not None else {}
    todo, carry, unchanged = [], [], 0
    present = set()
    for e in entries:
        if e.modality not in types:
            present.add(e.path)
            continue
        present.add(e.path)
        row = known.get(e.path)
        if row and same_stat(row, e) and not row.needs_meta:
            unchanged += 1
        elif row is None and (old := salvage.get(e.path)) is not None and same_stat(old, e):
            carry.append(old)
        elif row or failing.get(e.path) != (e.size, e.mtime_ns):
            todo.append((e, row))  # new or changed (a file that failed is retried once changed)
    vanished = {p: r for p, r in known.items() if p not in present}
    gone_failures = [p for p in failing if p not in present]
    return Plan(todo, unchanged, vanished, gone_failures, carry)


def same_stat(row: FileRow, e: FileEntry) -> bool:
    return row.size == e.size and row.mtime_ns == e.mtime_ns and row.modality == e.modality
