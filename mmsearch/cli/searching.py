"""`mmsearch search`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import (
    DEFAULT_INDEX,
    SearchOptions,
)
from ..modalities import span_of
from .app import (
    EXIT_CODES,
    NOTHING_FOUND,
    TYPE_HELP,
    Debug,
    Device,
    IndexDir,
    IndexName,
    Json,
    Modality,
    app,
    clock,
    emit_json,
    handle_errors,
    resolve_root,
    say,
    shown,
)


@app.command(epilog=EXIT_CODES)
@handle_errors
def search(
    query: Annotated[
        str | None,
        typer.Argument(
            help="Text query; supports 'a + b - c' and weights '2:a'.", show_default=False
        ),
    ] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query by example image.")] = None,
    audio: Annotated[Path | None, typer.Option("--audio", help="Query by example sound.")] = None,
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="Number of results.")] = 10,
    kind: Annotated[Modality, typer.Option("--type", "-t", help=TYPE_HELP)] = Modality.any,
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Search an index by text, image or sound. Exits 1 when nothing is found."""
    from ..search import Searcher, check_query

    check_query(query, image, audio)  # the query's terms and files, before any index or model
    options = SearchOptions(
        name=index_name, root_dir=resolve_root(index_dir), k=k, modality=kind.value, device=device
    )
    with Searcher(options) as searcher:
        hits = searcher.search(query, image=image, audio=audio)
        for note in searcher.col.notes:
            say(f"mmsearch: warning: {note}", err=True)
    if not hits:
        if not as_json:
            say("no results", err=True)
        raise typer.Exit(NOTHING_FOUND)
    for hit in hits:
        d = hit.to_dict()
        if as_json:
            emit_json(d)
            continue
        where = ""
        if hit.start is not None:
            if span_of(hit.modality) == "seconds":
                where = f"  [{clock(hit.start)}-{clock(hit.end)}]"
            else:
                where = f"  [lines {d['start']}-{d['end']}]"
        say(f"{hit.rank:>3}  {hit.score:6.3f}  {hit.modality:<5}  {shown(hit.path)}{where}")
