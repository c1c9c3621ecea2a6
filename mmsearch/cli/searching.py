"""`mmsearch search`: one query, or a file of them (--queries)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..config import (
    DEFAULT_INDEX,
    SearchOptions,
)
from ..errors import UsageError
from ..filters import FileFilter
from ..modalities import span_of
from .app import (
    EXIT_CODES,
    NOTHING_FOUND,
    app,
    clock,
    emit_json,
    handle_errors,
    one_line,
    resolve_root,
    say,
    shown,
)
from .options import TYPE_HELP, Debug, Device, IndexDir, IndexName, Json, Modality


def _filter(flag: str, metavar: str, help: str):
    """The option of a file filter (filters.FileFilter.parse reads its text); none by default."""
    return typer.Option(flag, metavar=metavar, help=help, show_default=False)


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
    queries: Annotated[
        Path | None,
        typer.Option(
            "--queries",
            metavar="FILE",
            help="Answer every query in FILE (one per line, '-' for stdin; a line may add "
            "--image/--audio FILE) in one process; --json rows carry `query`.",
            show_default=False,
        ),
    ] = None,
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
    paths: Annotated[
        list[str] | None,
        typer.Option(
            "--path",
            metavar="GLOB",
            help="Only files whose absolute path matches this glob (* and ? match '/' too; a "
            "relative one is taken from here; no wildcard: that folder). Repeatable: any.",
            show_default=False,
        ),
    ] = None,
    after: Annotated[
        str | None,
        _filter(
            "--after",
            "DATE",
            "Only files taken on or after DATE (YYYY-MM-DD[THH:MM], local time): a photo's "
            "EXIF date, else the file's mtime.",
        ),
    ] = None,
    before: Annotated[
        str | None, _filter("--before", "DATE", "Only files taken before DATE.")
    ] = None,
    min_size: Annotated[
        str | None, _filter("--min-size", "SIZE", "Only files of at least SIZE (e.g. 200k, 2M).")
    ] = None,
    max_size: Annotated[
        str | None, _filter("--max-size", "SIZE", "Only files of at most SIZE.")
    ] = None,
    group: Annotated[
        bool,
        typer.Option(
            "--group", help="One row per file: its best segment, the others counted (+N)."
        ),
    ] = False,
    exclude_self: Annotated[
        bool,
        typer.Option(
            "--exclude-self",
            help="Leave out the --image/--audio query file and its byte-identical copies.",
        ),
    ] = False,
    query_model: Annotated[
        str | None,
        typer.Option(
            "--query-model",
            metavar="DIR|NAME",
            help="Embed text queries with this query tower (from mmsearch distill-text, or a "
            "published one aligned to the index's model) instead of the index's own.",
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
    from ..search import Searcher, check_query, parse_query
    from ..search.batch import BatchQuery
    from ..storage.vectors.faiss_index import search_on_one_thread

    if queries is not None:
        if query is not None or image is not None or audio is not None:
            raise UsageError(
                "--queries reads the queries from a file: give no QUERY, --image or --audio with it"
            )
        batch = _read_batch(queries)
    else:
        check_query(query, image, audio)  # the query's terms and files, before any index or model
        batch = [BatchQuery(0, query or "", query, image, audio)]
    options = SearchOptions(
        name=index_name,
        root_dir=resolve_root(index_dir),
        k=k,
        modality=kind.value,
        device=device,
        min_relevance=min_relevance,
        filters=FileFilter.parse(paths or (), after, before, min_size, max_size),
        group=group,
        exclude_self=exclude_self,
        query_model=query_model,
    )
    found = False
    search_on_one_thread()  # queries come one at a time (benchmarks/RESULTS.md, serve)
    with Searcher(options) as searcher:
        for note in searcher.col.notes:
            say(f"mmsearch: warning: {note}", err=True)
        told = len(searcher.col.notes)
        if queries is not None:  # every text query embedded in one batch
            searcher.prepare_texts([t.text for q in batch if q.query for t in parse_query(q.query)])
        for i, q in enumerate(batch):
            hits = searcher.search(q.query, image=q.image, audio=q.audio)
            found = found or bool(hits)
            if queries is None:
                _show(hits, as_json, cut=min_relevance)
            else:
                _show_batch(q, hits, as_json, first=i == 0, cut=min_relevance)
                sys.stdout.flush()  # a script reading the answers gets each as it comes
        for note in searcher.col.notes[told:]:  # found while searching (a calibration fitted)
            say(f"mmsearch: warning: {note}", err=True)
    if not found:
        raise typer.Exit(NOTHING_FOUND)


def _read_batch(source: Path):
    from ..search.batch import read_queries

    name = "stdin" if str(source) == "-" else str(source)
    try:
        if str(source) == "-":
            return read_queries(sys.stdin, name)
        if source.is_dir():
            raise UsageError(f"--queries {source} is a folder, not a file of queries")
        with open(source, encoding="utf-8") as f:
            return read_queries(f, name)
    except FileNotFoundError:
        raise UsageError(f"queries file not found: {source}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--queries {name} is not UTF-8 text") from None


def _show(hits, as_json: bool, extra: dict | None = None, cut: float | None = None) -> None:
    if not hits and not as_json:
        say(
            "no results" + ("" if cut is None else f" with relevance >= {cut:g}"), err=extra is None
        )
    for hit in hits:
        if as_json:
            emit_json({**(extra or {}), **hit.to_dict()})
        else:
            _row(hit)


def _show_batch(q, hits, as_json: bool, first: bool, cut: float | None) -> None:
    """A query's answer in a batch: JSON rows carrying the query, or a table under a header."""
    if not as_json:
        say(("" if first else "\n") + f"# {one_line(q.text)}")
    _show(hits, as_json, {"query": q.text, "line": q.line}, cut)


def _row(hit) -> None:
    """One hit as a table row; a note hit's lines below it, numbered as ripgrep numbers them."""
    where = ""
    if hit.start is not None:
        if span_of(hit.modality) == "seconds":
            where = f"  [{clock(hit.start)}-{clock(hit.end)}]"
        else:
            d = hit.to_dict()
            where = f"  [lines {d['start']}-{d['end']}]"
    more = f"  (+{hit.more} more)" if hit.more else ""
    say(
        f"{hit.rank:>3}  {hit.relevance:5.2f}  {hit.score:6.3f}  {hit.modality:<5}  "
        f"{shown(hit.path)}{where}{more}"
    )
    for n, line in enumerate(hit.snippet or (), start=int(hit.start or 0)):
        say(f"{n:>10}: {one_line(line)}")
