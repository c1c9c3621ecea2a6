"""`mmsearch index` and `mmsearch align-audio`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import (
    DEFAULT_INDEX,
    DEFAULT_MAX_NOTE_BYTES,
    EncoderOptions,
    IndexOptions,
    ModelSpec,
    RaySettings,
)
from ..errors import UsageError
from ..modalities import MODALITIES
from .app import app, handle_errors, one_line, resolve_root, say, shown
from .options import Debug, Device, IndexDir, IndexName, IndexType, Json
from .progress import run_reported


@app.command()
@handle_errors
def index(
    paths: Annotated[
        list[Path], typer.Argument(help="Folders or files to index.", show_default=False)
    ],
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="open_clip model: NAME, NAME:TAG, hf-hub:org/repo, local-dir:PATH or a "
            "directory. Default: the index's model, else ViT-B-32:laion2b_s34b_b79k.",
        ),
    ] = None,
    audio_model: Annotated[
        str | None, typer.Option("--audio-model", help="CLAP model for audio files.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Files embedded per model call.")
    ] = 32,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", min=0, help="Decoding processes.")
    ] = None,
    hidden: Annotated[bool, typer.Option("--hidden", help="Include hidden files.")] = False,
    follow_links: Annotated[
        bool, typer.Option("--follow-links", help="Follow directory symlinks.")
    ] = False,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Re-embed everything (e.g. with a new --model).")
    ] = False,
    device: Device = "auto",
    index_type: Annotated[
        IndexType | None,
        typer.Option(
            "--index-type",
            help="Vector index: auto (exact below 300k vectors, IVF tuned to recall@10 >= 0.95 "
            "above), flat (always exact) or ivf (IVF once there are enough vectors to train it). "
            "Remembered by the index. Default: the index's own choice, auto for a new index.",
            show_default=False,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Embed on a Ray cluster: auto (the running one), ray://HOST:PORT, or local "
            "(start one here). Workers must see the files and the model at the same paths.",
            show_default=False,
        ),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option("--ray-actors", min=1, help="Encoder actors (default: one per GPU)."),
    ] = None,
    types: Annotated[
        str | None,
        typer.Option(
            "--types",
            help=f"Comma-separated types this run indexes: {', '.join(MODALITIES)} (default: "
            "all). Indexed files of other types are left as they are.",
            show_default=False,
        ),
    ] = None,
    max_note_bytes: Annotated[
        int,
        typer.Option(
            "--max-note-bytes",
            min=1,
            help="Index at most this many bytes of each note; a longer one is indexed up to "
            "here and reported as truncated.",
        ),
    ] = DEFAULT_MAX_NOTE_BYTES,
    query_model: Annotated[
        str | None,
        typer.Option(
            "--query-model",
            help="Make this the index's tower for text queries: a directory from mmsearch "
            "distill-text, or a published tower aligned to the index's model (see README, "
            "'Queries in other languages'). Searches then use it without being told.",
            show_default=False,
        ),
    ] = None,
    no_query_model: Annotated[
        bool,
        typer.Option(
            "--no-query-model",
            help="Forget the index's tower for text queries: its model's own text tower reads "
            "them again.",
        ),
    ] = False,
    as_json: Json = False,
    debug: Debug = False,
):
    """Index folders of images, notes and audio (incremental: only new/changed files are embedded)."""
    from ..pipeline.run import check_types, index_paths

    chosen = None
    if types is not None:
        chosen = tuple(t.strip() for t in types.split(",") if t.strip())
        check_types(chosen or ("",))

    ray = None
    if ray_address is not None:
        from ..pipeline.ray import check_available, quiet

        check_available()
        quiet()
        ray = RaySettings(address=ray_address, actors=ray_actors)
    elif ray_actors is not None:
        raise UsageError("--ray-actors goes with --ray")

    options = IndexOptions(
        roots=tuple(paths),
        name=index_name,
        root_dir=resolve_root(index_dir),
        encoder=EncoderOptions(
            model=ModelSpec.parse(model) if model else None,
            device=device,
            audio_model=audio_model,
        ),
        batch_size=batch_size,
        workers=workers,
        hidden=hidden,
        follow_links=follow_links,
        rebuild=rebuild,
        index_type=index_type.value if index_type else None,
        ray=ray,
        types=chosen,
        max_note_bytes=max_note_bytes,
        query_model=query_model,
        no_query_model=no_query_model,
    )
    report = run_reported(index_paths, options, as_json)
    if as_json:
        return
    for path, what in report.partial[:20]:
        say(f"indexed in part {shown(path)}: {one_line(what)}", err=True)
    for path, reason in report.failures[:20]:
        say(f"skipped {shown(path)}: {one_line(reason)}", err=True)
    if len(report.failures) > 20:
        say(f"... and {len(report.failures) - 20} more (see: mmsearch failures)", err=True)
    r = report
    say(
        f"index {index_name!r}: {r.added} added, {r.updated} updated, {r.removed} removed, "
        f"{r.moved} moved, {r.unchanged} unchanged, {r.failed} failed; "
        f"{r.files} files, {r.vectors} vectors ({r.seconds:.1f}s)"
    )


# --- audio alignment --------------------------------------------------------------------------
@app.command("align-audio")
@handle_errors
def align_audio(
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    audio_model: Annotated[
        str | None,
        typer.Option("--audio-model", help="CLAP model (default: the index's, else LAION CLAP)."),
    ] = None,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Fit the audio projector into the index's CLIP space again and re-embed its audio."""
    from ..pipeline.run import align_audio as realign

    options = IndexOptions(
        roots=(),
        name=index_name,
        root_dir=resolve_root(index_dir),
        encoder=EncoderOptions(device=device, audio_model=audio_model),
    )
    report = run_reported(realign, options, as_json)
    if not as_json:
        say(
            f"index {index_name!r}: audio re-aligned; {report.updated} audio files re-embedded, "
            f"{report.removed} removed, {report.failed_now} failed ({report.seconds:.1f}s)"
        )
