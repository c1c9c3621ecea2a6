"""`mmsearch duplicates`."""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from ..config import DEFAULT_INDEX
from ..errors import UsageError
from ..modalities import BY_NAME
from ..search.duplicates import MAX_HASH_DISTANCE, duplicate_types
from .app import EXIT_CODES, NOTHING_FOUND, app, emit_json, handle_errors, resolve_root, say, shown
from .options import Debug, IndexDir, IndexName, Json

DuplicateType = enum.Enum("DuplicateType", [(m, m) for m in (*duplicate_types(), "any")], type=str)
_DEFAULTS = ", ".join(f"{m} {BY_NAME[m].duplicate_cosine}" for m in duplicate_types())


@app.command(epilog=EXIT_CODES)
@handle_errors
def duplicates(
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            min=-1.0,
            max=1.0,
            help=f"Cosine two files' vectors need to be copies (default per type: {_DEFAULTS}).",
            show_default=False,
        ),
    ] = None,
    kind: Annotated[
        DuplicateType,
        typer.Option(
            "--type", "-t", help=f"What to compare: {', '.join(duplicate_types())} or any."
        ),
    ] = DuplicateType.any,
    max_hash_distance: Annotated[
        int,
        typer.Option(
            "--max-hash-distance",
            min=0,
            max=64,
            help="Photos: bits (of 64) in which their perceptual hashes may differ.",
        ),
    ] = MAX_HASH_DISTANCE,
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    as_json: Json = False,
    debug: Debug = False,
):
    """Groups of files that are copies, resized or recompressed versions of each other, from
    the vectors (and photos' perceptual hashes) already in the index. Exits 1 when none."""
    from ..search.duplicates import find_duplicates
    from ..storage.collection import Collection

    with Collection.open_reader(resolve_root(index_dir), index_name) as col:
        for note in col.notes:
            say(f"mmsearch: warning: {note}", err=True)
        if col.encoder_identity is None:
            raise UsageError(f"index {index_name!r} is empty: index some files first")
        found = find_duplicates(col.catalog, col.dim, kind.value, threshold, max_hash_distance)
    for modality, count in found.unhashed.items():
        say(
            f"mmsearch: {count} {modality} files have no perceptual hash (indexed by an older "
            "mmsearch) and were not compared; `mmsearch index` on their folders records it "
            "without embedding them again",
            err=True,
        )
    if not found.groups:
        if not as_json:
            say("no duplicates found", err=True)
        raise typer.Exit(NOTHING_FOUND)
    for n, group in enumerate(found.groups, start=1):
        if as_json:
            emit_json(group.to_dict())
            continue
        say(
            ("" if n == 1 else "\n")
            + f"group {n}: {len(group.files)} {group.modality} files, score {group.score:.3f}"
        )
        for f in group.files:
            pixels = f"  {f.width}x{f.height}" if f.width and f.height else ""
            say(f"  {shown(f.path)}{pixels}  {_size(f.size)}")


def _size(n: float) -> str:
    """Bytes as `ls -h` shows them: 912B, 240.0K, 2.1M."""
    for unit in "BKMG":
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")
