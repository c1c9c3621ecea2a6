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
    min_relevance: Annotated[
        float | None,
        typer.Option(
            "--min-relevance",
            min=0.0,
            max=1.0,
            help="Drop hits whose relevance (0-1, comparable across types and queries) is below "
            "this; 0.5 keeps hits more likely related to the query than not.",
            show_default=False,
        ),
    ] = None,
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Search an index by text, image or sound. Exits 1 when nothing is found.

    Hits are ranked by relevance, a calibrated 0-1 estimate that a hit is related to the query,
    comparable across photos, notes and recordings; the table shows it beside the raw cosine."""
    from ..search import Searcher, check_query

    check_query(query, image, audio)  # the query's terms and files, before any index or model
    options = SearchOptions(
        name=index_name,
        root_dir=resolve_root(index_dir),
        k=k,
        modality=kind.value,
        device=device,
        min_relevance=min_relevance,
    )
    with Searcher(options) as searcher:
        hits = searcher.search(query, image=image, audio=audio)
        for note in searcher.col.notes:
            say(f"mmsearch: warning: {note}", err=True)
    if not hits:
        if not as_json:
            cut = "" if min_relevance is None else f" with relevance >= {min_relevance:g}"
            say(f"no results{cut}", err=True)
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
        say(
            f"{hit.rank:>3}  {hit.relevance:5.2f}  {hit.score:6.3f}  {hit.modality:<5}  "
            f"{shown(hit.path)}{where}"
        )
