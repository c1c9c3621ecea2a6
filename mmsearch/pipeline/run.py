"""Incremental indexing: walk the roots, embed new and changed files, drop vanished ones.

files -> loaders (worker processes) -> encoders -> catalog + vectors, committed in chunks so a run
killed at any point keeps what it committed and the next run resumes without duplicates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ..config import IndexOptions
from ..encoders import Encoder
from ..errors import IndexNotFoundError, ModelError
from ..loaders import LoadSettings
from ..modalities import BY_NAME, TABLE
from ..records import AUDIO, FileEntry, IndexReport
from ..storage import calibration
from ..storage.catalog import FileRow
from ..storage.collection import Collection
from .commit import Pacer, commit_chunk, embedded_chunks, fail_file
from .models import (
    attach_index_audio,
    encoder_for,
    keep_query_tower,
    query_tower_record,
    text_embedder,
)
from .plan import Plan, check_types, plan
from .walk import check_roots, walk

Progress = Callable[..., None]


def index_paths(options: IndexOptions, progress: Progress | None = None) -> IndexReport:
    """Bring the index `options.name` up to date with the files under `options.roots`."""
    started = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    roots = check_roots(list(options.roots))
    if options.ray is not None and options.ray.address != "local":
        # reach the cluster before seconds of model loading (a local one starts when needed)
        from .ray import connect

        connect(options.ray)
    types = check_types(options.types)
    col = Collection.open_writer(options.root_dir, options.name, repair=options.rebuild)
    try:
        if not options.rebuild:
            col.discard_pending()
        # With the index's own model, loading it (seconds of torch imports) waits until a file
        # actually needs embedding, so a run that finds nothing new is quick.
        eager = options.encoder.model is not None or options.rebuild or not col.encoder_identity
        encoder = encoder_for(col, options) if eager else None
        identity = encoder.identity if encoder is not None else col.encoder_identity
        query = query_tower_record(options, identity)  # refused before any work
        report = _run(col, encoder, roots, options, types, progress)
        keep_query_tower(col, query, report.notes, drop=options.no_query_model)
        report.notes = list(col.notes) + report.notes
    finally:
        col.close()
    report.seconds = time.perf_counter() - started
    return report


def _run(col: Collection, encoder, roots, options: IndexOptions, types, progress) -> IndexReport:
    progress("scan", 0, 0)
    entries = list(walk(roots, hidden=options.hidden, follow_links=options.follow_links))
    p = plan(col, entries, roots, types)
    report = IndexReport(unchanged=p.unchanged)
    if encoder is None and p.todo:
        encoder = encoder_for(col, options)
    if encoder is None:  # nothing to embed: only removals
        encoder = Encoder(identity=col.encoder_identity, dim=col.dim)
    if encoder.audio is None and any(BY_NAME[e.modality].uses(AUDIO) for e, _ in p.todo):
        try:
            attach_index_audio(col, encoder, options, progress)
        except (ModelError, OSError) as e:
            # A missing audio model fails the recordings, not the run; they are retried on
            # every run until it loads. Videos keep their frames, without their sound.
            advice = (  # once: the loader's own message may already say what to pass
                "then run mmsearch index again"
                if "--audio-model" in str(e)
                else "pass --audio-model with a CLAP model that loads (a hub id or a local "
                "directory) and run mmsearch index again"
            )
            reason = f"audio model could not be loaded ({e}); {advice}"
            needs = [x for x in p.todo if BY_NAME[x[0].modality].tower == AUDIO]
            _fail_model(col, needs, reason, report)
            p.todo = [x for x in p.todo if BY_NAME[x[0].modality].tower != AUDIO]
            if any(BY_NAME[e.modality].uses(AUDIO) for e, _ in p.todo):
                report.notes.append(f"videos are indexed without their sound: {reason}")
    settings = LoadSettings(
        image_prep=encoder.prep,
        modalities=frozenset(m.name for m in TABLE if getattr(encoder, m.tower) is not None),
        max_note_bytes=options.max_note_bytes,
        jpeg_bytes=decodes_on_gpu(encoder, options),
    )
    _apply(col, encoder, p, settings, options, report, progress)
    return _totals(col, report)


def decodes_on_gpu(encoder: Encoder, options: IndexOptions) -> bool:
    """Whether JPEGs are decoded on the image tower's GPU (loaders.gpu_jpeg): when it runs on
    CUDA on this machine. Ray actors decode on their CPUs, as before."""
    device = str(getattr(encoder.image, "device", "cpu"))
    return options.ray is None and device.startswith("cuda")


def _fail_model(col: Collection, todo, reason: str, report: IndexReport) -> None:
    removed: list[int] = []
    with col.catalog.transaction():
        for e, old in todo:
            fail_file(col.catalog, e, reason, old, removed, report, retry=True)
    col.vectors.remove(removed)


def _carry(col: Collection, rows: list[FileRow], report: IndexReport) -> None:
    """Copy a rebuild's intact files from the old generation, a few thousand per commit."""
    for start in range(0, len(rows), 2048):
        added = []
        with col.catalog.transaction():
            for row in rows[start : start + 2048]:
                added.append(col.catalog.copy_file(col.salvage, row))
        for ids, vecs in added:
            col.vectors.add(ids, vecs)
        report.unchanged += len(added)


def _apply(col, encoder, p: Plan, settings, options, report, progress, reuse_ok=True) -> None:
    """Embed and commit `p.todo` piece by piece, drop `p.vanished`, save the vectors (or make
    the generation a rebuild wrote the live one)."""
    # The vectors are loaded before the first commit: loaded after it, from a catalog that
    # already holds the chunk's rows, they would get those rows twice.
    vectors = col.vectors
    total = len(p.todo)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        progress("embed", done, total)

    tick(0)
    pacer = Pacer(options.commit_seconds, options.batch_size)
    try:
        if p.carry:
            _carry(col, p.carry, report)
        for loaded, embed in embedded_chunks(col, encoder, p, settings, options):
            for piece in pacer.pieces(loaded):
                embedded = commit_chunk(
                    col, encoder, piece, p, report, options, tick, reuse_ok, embed=embed
                )
                tick(len(piece) - embedded)
        with col.catalog.transaction():
            removed_ids = []
            for row in p.vanished.values():
                removed_ids += col.catalog.delete_file(row.id)
                report.removed += 1
            for path in p.vanished_failures:
                col.catalog.clear_failure(path)
        vectors.remove(removed_ids)
    except BaseException:
        try:
            col.save_vectors()  # what was committed, as it is: no retraining on the way out
        except Exception:  # noqa: BLE001 - the catalog holds every vector; readers rebuild
            pass
        raise
    if col.building is not None:
        col.finish_generation(options, progress)
    else:
        col.save_vectors(options, progress)
    calibration.refresh(col, text_embedder(col, encoder, options))


def _totals(col: Collection, report: IndexReport) -> IndexReport:
    """Fill in what the index holds now (files, vectors, files currently failing)."""
    counts = col.catalog.counts()
    report.files, report.vectors = counts["files"], counts["vectors"]
    report.failed = counts["failures"]
    return report


def align_audio(options: IndexOptions, progress: Progress | None = None) -> IndexReport:
    """Fit the audio projector afresh for this index's models and re-embed its recordings and
    videos (whose sound is embedded with it).

    Written as a new generation (the other files' vectors are copied over): killed, the index
    answers with the old projector as before, and running it again resumes."""
    started = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    col = Collection.open_writer(options.root_dir, options.name)
    try:
        if not col.encoder_identity:
            raise IndexNotFoundError(f"index {options.name!r} is empty: index some files first")
        encoder = encoder_for(col, options)
        attach_index_audio(col, encoder, options, progress, realign=True, record=False)
        col.begin_generation(encoder.identity, audio=encoder.audio.identity)
        if col.audio_identity is None:
            from ..encoders.clap import save_projector

            projector = encoder.audio.projector
            col.set_audio(encoder.audio.identity, lambda path: save_projector(projector, path))
        live = col.salvage
        done = col.catalog.files_under([b"/"])
        rows = [r for r in live.files_under([b"/"]).values() if r.path not in done]
        todo, gone = [], 0
        sounding = {m.name for m in TABLE if m.uses(AUDIO)}  # recordings, and videos' sound
        for row in rows:
            if row.modality not in sounding:
                continue
            try:
                st = os.stat(row.path)
            except OSError:
                gone += 1
                continue
            todo.append((FileEntry(row.path, row.modality, st.st_size, st.st_mtime_ns), None))
        if not done:  # a fresh generation: the failures stay recorded
            with col.catalog.transaction():
                col.catalog.copy_failures(live.all_failures())
        p = Plan(todo, 0, {}, [], carry=[r for r in rows if r.modality not in sounding])
        report = IndexReport(removed=gone)
        settings = LoadSettings(image_prep=encoder.prep, modalities=frozenset(sounding))
        # every recording (and video) is embedded afresh: no reuse of the vectors being replaced
        _apply(col, encoder, p, settings, options, report, progress, reuse_ok=False)
        report.updated, report.unchanged = report.added, 0
        report.added = 0
        _totals(col, report)
        report.notes = list(col.notes)
    finally:
        col.close()
    report.seconds = time.perf_counter() - started
    return report
