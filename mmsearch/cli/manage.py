"""`mmsearch info`, `mmsearch failures`, `mmsearch list`."""

from __future__ import annotations

from ..config import (
    DEFAULT_INDEX,
    find_index_root,
)
from .app import app, emit_json, handle_errors, one_line, resolve_root, say, shown
from .options import Debug, IndexDir, IndexName, Json


def _vector_index_info(vi) -> dict:
    """An approximate index's search settings and measured recall, from the manifest."""
    keys = ("nprobe", "nlist", "recall_at_10")
    return {k: getattr(vi, k) for k in keys if getattr(vi, k) is not None}


def _engines(col, vectors: int) -> dict | None:
    """Which engine answers a CLI search and a server (storage.vectors.engine), as dicts."""
    if not col.encoder_identity:
        return None
    from ..storage.vectors.engine import describe_engines

    found = describe_engines(col.manifest.index_type, vectors, col.dim)
    return {use: engine.as_dict() for use, engine in found.items()}


@app.command()
@handle_errors
def info(
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    as_json: Json = False,
    debug: Debug = False,
):
    """Show an index's model, size and counts."""
    from ..encoders import EncoderIdentity
    from ..storage.collection import Collection
    from ..storage.manifest import FORMAT_VERSION

    with Collection.open_reader(resolve_root(index_dir), index_name) as col:
        for note in col.notes:
            say(f"mmsearch: warning: {note}", err=True)
        counts = col.catalog.counts()
        enc = col.encoder_identity or EncoderIdentity(key="")  # no model loaded yet
        audio = col.manifest.audio_encoder
        data = {
            "name": index_name,
            "path": str(col.dir.resolve()),
            "model": enc.spec,
            "weights": enc.weights,
            "dim": enc.dim,
            "audio_model": audio.spec if audio else None,
            "query_model": (col.manifest.query_tower or {}).get("source"),
            "files": counts["files"],
            "vectors": counts["vectors"],
            "failures": counts["failures"],
            "modalities": counts["by_modality"],
            "index_type": col.manifest.index_type,
            **_vector_index_info(col.manifest.vector_index),
            "engine": _engines(col, counts["vectors"]),
            "created": col.manifest.created,
            "updated": col.manifest.updated,
            "format_version": FORMAT_VERSION,
            # an interrupted --rebuild or align-audio that the next one resumes
            "unfinished_rebuild": col.manifest.pending,
        }
    if as_json:
        emit_json(data)
        return
    width = 2 + max(len(k) for k, v in data.items() if v is not None)
    for key, value in data.items():
        if key == "modalities":
            for m, c in value.items():
                say(f"{m + ':':<{width}}{c['files']} files, {c['vectors']} vectors")
        elif key == "engine" and value:
            from ..storage.vectors.engine import Engine

            for use, engine in value.items():
                say(f"{f'{use} engine:':<{width}}{Engine(**engine)}")
        elif value is not None:
            paths = ("path", "model", "query_model")
            say(f"{key + ':':<{width}}{shown(str(value)) if key in paths else value}")


@app.command()
@handle_errors
def failures(
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    as_json: Json = False,
    debug: Debug = False,
):
    """List files that could not be indexed, with the reason."""
    from ..records import path_fields
    from ..storage.collection import Collection

    with Collection.open_reader(resolve_root(index_dir), index_name) as col:
        rows = col.catalog.failures()
    for path, reason, modality in rows:
        if as_json:
            emit_json({**path_fields(path), "reason": reason, "modality": modality})
        else:
            say(f"{shown(path)}: {one_line(reason)}")


@app.command("list")
@handle_errors
def list_(index_dir: IndexDir = None, as_json: Json = False, debug: Debug = False):
    """List the indexes under the index root, and say where that root is and why."""
    from ..storage.collection import Collection
    from ..storage.layout import list_indexes

    found = find_index_root(index_dir)
    root = found.path
    say(f"indexes in {shown(str(root.absolute()))} ({found.source})", err=True)
    names = list_indexes(root)
    if not names:
        say("no index there yet; create one with: mmsearch index PATH", err=True)
    for name in names:
        with Collection.open_reader(root, name) as col:
            counts = col.catalog.counts()
            # an index whose model never loaded still says which one it will use
            known = col.encoder_identity
            model = (known.spec if known else None) or col.manifest.model_spec
        if as_json:
            emit_json(
                {
                    "name": name,
                    "model": model,
                    "files": counts["files"],
                    "vectors": counts["vectors"],
                    "root": str(root.absolute()),
                    "root_source": found.source,
                }
            )
        else:
            say(f"{name}\t{counts['files']} files\t{shown(str(model))}")
