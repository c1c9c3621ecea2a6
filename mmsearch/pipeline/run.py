"""Incremental indexing: walk the roots, embed new and changed files, drop vanished ones.

files -> loaders (worker processes) -> encoders -> catalog + vectors, committed in chunks so a run
killed at any point keeps what it committed and the next run resumes without duplicates.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..config import DEFAULT_MODEL, IndexOptions, ModelSpec
from ..embed import Interrupted, embed_loaded
from ..encoders import (
    Encoder,
    attach_audio,
    create_encoder,
    export_query_tower,
    query_text_tower,
)
from ..errors import IndexNotFoundError, ModelError, ModelMismatchError, UsageError
from ..loaders import Loaded, LoadSettings, load_file
from ..modalities import TABLE
from ..records import AUDIO, MODALITIES, FileEntry, IndexReport, Segment, show_path
from ..storage import calibration
from ..storage.atomic import write_error
from ..storage.catalog import FileRow
from ..storage.collection import Collection, model_cache_dir
from .walk import check_roots, walk

Progress = Callable[..., None]


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


def default_workers() -> int:
    # Encoding takes the cores; one decoder per spare core keeps it fed (more starves the encoder).
    return max(1, min(8, (os.cpu_count() or 2) - 1))


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
        encoder = _encoder_for(col, options) if eager else None
        report = _run(col, encoder, roots, options, types, progress)
        report.notes = list(col.notes)
    finally:
        col.close()
    report.seconds = time.perf_counter() - started
    return report


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


def _encoder_for(col: Collection, options: IndexOptions) -> Encoder:
    requested = options.encoder.model
    if requested is None:
        known = col.encoder_identity
        spec = known["spec"] if known else col.manifest.get("model_spec", DEFAULT_MODEL)
        requested = ModelSpec.parse(spec)
    if not col.encoder_identity:
        # Remembered before seconds of loading: a run killed now still knows its --model.
        col.write_manifest(name=col.name, model_spec=str(requested))
    encoder = create_encoder(requested, options.encoder)
    if options.rebuild:
        col.begin_generation(encoder.identity)
    else:
        col.check_encoder(encoder.identity)
    if not col.encoder_identity:
        col.set_encoder(encoder.identity)
    cache = model_cache_dir(col.root_dir, encoder.identity["key"])
    try:
        export_query_tower(encoder, cache)
    except OSError as e:
        raise write_error(cache, e) from None
    return encoder


def _attach_audio(
    col: Collection,
    encoder: Encoder,
    options: IndexOptions,
    progress,
    realign: bool = False,
    record: bool = True,
) -> None:
    """Load the audio tower for this index: --audio-model if given, else the audio model and
    projector of a fine-tuned --model directory if it has them, else the index's own. With
    `realign`, the projector is fitted afresh (and recorded by the caller, `record=False`)."""
    from ..encoders.audio import (
        AUDIO_MODEL_DIRNAME,
        PROJECTOR_FILENAME,
        model_dir_audio_model,
        model_dir_of,
        save_projector,
    )

    known = col.audio_identity
    # a rebuild keeps the live generation's audio model unless told otherwise
    previous = known or col.manifest.get("audio_encoder")
    model_dir = model_dir_of(encoder) if options.encoder.model is not None else None
    from_model_dir = model_dir is not None and (
        (model_dir / AUDIO_MODEL_DIRNAME).is_dir() or (model_dir / PROJECTOR_FILENAME).is_file()
    )
    requested = options.encoder.audio_model
    if requested is None and from_model_dir:
        requested = model_dir_audio_model(encoder)
    if requested is None and previous:
        requested = previous["spec"]
    stored = col.projector_path
    use_stored = (
        known
        and not from_model_dir
        and requested == known["spec"]
        and stored.is_file()
        and not realign
    )
    attach_audio(
        encoder,
        requested,
        model_cache_dir(col.root_dir, encoder.identity["key"]),
        projector=stored if use_stored else None,
        refit=realign,
        progress=lambda stage, done, total: progress(f"audio:{stage}", done, total),
    )
    identity = encoder.audio.identity
    if realign:
        known = None
    elif known and known.get("key") != identity["key"]:
        source = f" (from model directory {model_dir})" if from_model_dir else ""
        raise ModelMismatchError(
            f"index {col.name!r} holds audio embedded with another audio model than the one "
            f"requested{source}: {_difference(known, identity)}. Use the index's audio model, "
            f"re-align it with `mmsearch align-audio --index {col.name}`, or rebuild with --rebuild"
        )
    if not known and record:
        col.set_audio(identity, lambda path: save_projector(encoder.audio.projector, path))


def _difference(have: dict, want: dict) -> str:
    """The fields in which two identities differ, as 'field: index has X, requested Y'."""
    keys = [k for k in sorted(set(have) | set(want)) if k != "key" and have.get(k) != want.get(k)]
    if not keys:
        keys = ["key"]
    return "; ".join(f"{k}: index has {have.get(k)}, requested {want.get(k)}" for k in keys)


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
        if row and _same(row, e):
            unchanged += 1
        elif row is None and (old := salvage.get(e.path)) is not None and _same(old, e):
            carry.append(old)
        elif row or failing.get(e.path) != (e.size, e.mtime_ns):
            todo.append((e, row))  # new or changed (a file that failed is retried once changed)
    vanished = {p: r for p, r in known.items() if p not in present}
    gone_failures = [p for p in failing if p not in present]
    return Plan(todo, unchanged, vanished, gone_failures, carry)


def _same(row: FileRow, e: FileEntry) -> bool:
    return row.size == e.size and row.mtime_ns == e.mtime_ns and row.modality == e.modality


def _run(col: Collection, encoder, roots, options: IndexOptions, types, progress) -> IndexReport:
    progress("scan", 0, 0)
    entries = list(walk(roots, hidden=options.hidden, follow_links=options.follow_links))
    p = plan(col, entries, roots, types)
    report = IndexReport(unchanged=p.unchanged)
    if encoder is None and p.todo:
        encoder = _encoder_for(col, options)
    if encoder is None:  # nothing to embed: only removals
        encoder = Encoder(identity=col.encoder_identity, dim=col.dim)
    if encoder.audio is None and any(e.modality == AUDIO for e, _ in p.todo):
        try:
            _attach_audio(col, encoder, options, progress)
        except (ModelError, OSError) as e:
            # A missing audio model fails the recordings, not the run; they are retried on
            # every run until it loads.
            reason = (
                f"audio model could not be loaded ({e}); pass --audio-model with a CLAP model "
                "that loads (a hub id or a local directory) and run mmsearch index again"
            )
            _fail_model(col, [x for x in p.todo if x[0].modality == AUDIO], reason, report)
            p.todo = [x for x in p.todo if x[0].modality != AUDIO]
    settings = LoadSettings(
        image_prep=encoder.extras.get("prep"),
        audio=encoder.extras.get("audio_load"),
        modalities=frozenset(m.name for m in TABLE if getattr(encoder, m.tower) is not None),
        max_note_bytes=options.max_note_bytes,
    )
    _apply(col, encoder, p, settings, options, report, progress)
    return _totals(col, report)


def _fail_model(col: Collection, todo, reason: str, report: IndexReport) -> None:
    removed: list[int] = []
    with col.catalog.transaction():
        for e, old in todo:
            _fail(col.catalog, e, reason, old, removed, report, retry=True)
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


class _Pacer:
    """Splits decoded chunks into pieces committed at most every `seconds` of work, sized from
    the measured time per file (a slow model commits small pieces, a fast one whole chunks).
    A piece is never smaller than one encoder batch: smaller ones would cost throughput
    (measured: pieces of 1-2 files ran at a quarter of the rate), while a commit costs ~1 ms."""

    def __init__(self, seconds: float | None, batch: int):
        self.seconds = seconds
        self.batch = self.size = max(1, batch)

    def pieces(self, loaded: list):
        if not self.seconds:
            yield loaded
            return
        i = 0
        while i < len(loaded):
            piece = loaded[i : i + self.size]
            started = time.perf_counter()
            yield piece
            per_file = (time.perf_counter() - started) / len(piece)
            fits = int(self.seconds / max(per_file, 1e-6))
            self.size = max(self.batch, min(len(loaded), fits))
            i += len(piece)


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
    pacer = _Pacer(options.commit_seconds, options.batch_size)
    try:
        if p.carry:
            _carry(col, p.carry, report)
        for loaded, embed in _chunks(col, encoder, p, settings, options):
            for piece in pacer.pieces(loaded):
                embedded = _commit_chunk(
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
    calibration.refresh(col, _text_embedder(col, encoder, options))


def _text_embedder(col: Collection, encoder: Encoder, options: IndexOptions):
    """Embeds the relevance calibration's probe queries with the index's model: the run's own
    text tower, else the exported query tower, else the model loaded for it."""

    def embed(texts: list[str]) -> np.ndarray:
        if encoder.text is not None:
            return encoder.encode_text(texts)
        tower = query_text_tower(model_cache_dir(col.root_dir, col.encoder_identity["key"]))
        if tower is not None:
            return tower.embed(texts)
        spec = ModelSpec.parse(col.encoder_identity["spec"])
        return create_encoder(spec, options.encoder).encode_text(texts)

    return embed


def _totals(col: Collection, report: IndexReport) -> IndexReport:
    """Fill in what the index holds now (files, vectors, files currently failing)."""
    counts = col.catalog.counts()
    report.files, report.vectors = counts["files"], counts["vectors"]
    report.failed = counts["failures"]
    return report


def _chunks(col, encoder, p: Plan, settings: LoadSettings, options: IndexOptions):
    """(loaded files, embed function) per chunk to commit: decoded here and embedded by
    `_commit_chunk`, or hashed, decoded and embedded on a Ray cluster (`options.ray`)."""
    todo = p.todo
    if options.ray is None or not todo:
        for loaded in _load_chunks(todo, settings, options):
            yield loaded, None
        return
    from .ray import ray_chunks

    cache = model_cache_dir(col.root_dir, encoder.identity["key"])
    chunks = ray_chunks(todo, dict(p.vanished), encoder, settings, options, options.ray, cache)
    for loaded, results in chunks:

        def embed(items, tick, results=results):
            # A worker skips files whose content the index holds; should the commit still want
            # one embedded (its stored twin went meanwhile), it is embedded here.
            missing = [x for x in items if x.entry.path not in results]
            if missing:
                again = [load_file(x.entry, settings) for x in missing]
                ok = [x for x in again if x.error is None]
                fresh = iter(embed_loaded(encoder, ok, options.batch_size, lambda n: None))
                for x in again:
                    results[x.entry.path] = x.error if x.error is not None else next(fresh)
            tick(len(items))
            return [results[x.entry.path] for x in items]

        yield loaded, embed


def _load_chunks(todo, settings: LoadSettings, options: IndexOptions) -> Iterator[list[Loaded]]:
    """Decoded chunks in order; the next chunk decodes in worker processes while one is encoded."""
    size = max(1, options.commit_every)
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    workers = default_workers() if options.workers is None else options.workers
    if workers <= 0 or len(todo) < 8:
        for chunk in chunks:
            yield [load_file(e, settings) for e, _ in chunk]
        return
    # spawn, not fork: the parent holds torch's thread pools, which do not survive a fork.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_ignore_interrupt) as pool:
        pending = None
        for i, chunk in enumerate(chunks):
            if pending is None:
                pending = pool.starmap_async(load_file, [(e, settings) for e, _ in chunk], 4)
            nxt = None
            if i + 1 < len(chunks):
                nxt = pool.starmap_async(load_file, [(e, settings) for e, _ in chunks[i + 1]], 4)
            yield pending.get()
            pending = nxt


def _ignore_interrupt() -> None:
    """Decode workers leave Ctrl-C to the parent, which commits and stops them: no tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _commit_chunk(
    col, encoder: Encoder, loaded, p: Plan, report, options, tick, reuse_ok=True, embed=None
) -> int:
    """Embed and commit one chunk; returns how many files `tick` was already called for.
    `embed(items, tick)` gives each item's (segments, vectors) or failure reason (default: embed
    here with `encoder`)."""
    catalog = col.catalog
    old_rows = p.old_rows
    ok = [x for x in loaded if x.error is None]
    # 1. Reuse vectors of identical content already in the index (copies, moves, touched files).
    reuse: dict[int, FileRow] = {}
    salvaged: dict[int, FileRow] = {}
    for i, x in enumerate(ok if reuse_ok else []):
        old = old_rows.get(x.entry.path)
        if old is not None and old.hash == x.hash:
            reuse[i] = old
            continue
        src = catalog.file_with_hash(x.hash, x.entry.modality)
        if src is not None:
            reuse[i] = src
        elif col.salvage is not None:
            # a rebuild with the same model: intact vectors of the old generation are copied
            src = col.salvage.file_with_hash(x.hash, x.entry.modality)
            if src is not None:
                salvaged[i] = src
    # 2. Embed the rest; identical files within the chunk are embedded once.
    fresh: dict[str, tuple[list[Segment], np.ndarray]] = {}
    failed: dict[int, str] = {}
    to_embed = [i for i in range(len(ok)) if i not in reuse and i not in salvaged]
    first_of_hash = {}
    for i in to_embed:
        first_of_hash.setdefault(ok[i].hash, i)
    ticked = 0

    def counted(n: int) -> None:
        nonlocal ticked
        ticked += n
        tick(n)

    if embed is None:

        def embed(items, tick):
            return embed_loaded(encoder, items, options.batch_size, tick)

    interrupted = False
    try:
        embedded = embed([ok[i] for i in first_of_hash.values()], counted)
    except Interrupted as stop:  # Ctrl-C: what is embedded is committed, then we stop
        embedded, interrupted = stop.partial, True
    not_done = set()
    for (digest, _i), result in zip(first_of_hash.items(), embedded, strict=True):
        if result is None:
            not_done.add(digest)
        elif isinstance(result, str):
            failed[_i] = result
        else:
            fresh[digest] = result
    # 3. Write the chunk in one transaction, then mirror it in the vector index.
    added_ids, removed_ids = [], []
    with catalog.transaction():
        for x in loaded:
            if x.error is not None:
                _fail(catalog, x.entry, x.error, old_rows.get(x.entry.path), removed_ids, report)
        for i, x in enumerate(ok):
            e, old = x.entry, old_rows.get(x.entry.path)
            if i not in reuse and x.hash in not_done:
                continue  # interrupted before it was embedded: the next run does it
            if i in failed or (i not in reuse and i not in salvaged and x.hash not in fresh):
                reason = failed.get(i) or failed.get(first_of_hash.get(x.hash), "embedding failed")
                _fail(catalog, e, reason, old, removed_ids, report)
                continue
            catalog.clear_failure(e.path)
            if x.warning:  # indexed, but not all of it (a note over --max-note-bytes)
                catalog.record_failure(e, x.warning)
                report.partial.append((show_path(e.path), x.warning))
            src = reuse.get(i)
            if src is not None and old is not None and src.id == old.id:
                catalog.update_file(old.id, e, x.hash)  # touched, same content: nothing to embed
                report.unchanged += 1
                continue
            if src is not None and src.path in p.vanished and old is None:
                # a move: the old row takes the new path and keeps its vectors and ids
                catalog.update_file(src.id, e, x.hash)
                del p.vanished[src.path]
                report.moved += 1
                continue
            if src is not None or i in salvaged:
                units = catalog.units_of(src.id) if src else col.salvage.units_of(salvaged[i].id)
                segments = [s for s, _ in units]
                vecs = np.stack([v for _, v in units]) if units else np.zeros((0, encoder.dim))
            else:
                segments, vecs = fresh[x.hash]
            if old is None:
                file_id = catalog.add_file(e, x.hash)
                report.added += 1
            else:
                catalog.update_file(old.id, e, x.hash)
                file_id = old.id
                report.updated += 1
            gone, new = catalog.replace_units(file_id, segments, vecs)
            removed_ids += gone
            added_ids.append((new, vecs))
    col.vectors.remove(removed_ids)
    for ids, vecs in added_ids:
        col.vectors.add(ids, vecs)
    if interrupted:
        raise KeyboardInterrupt
    return ticked


def _fail(catalog, entry: FileEntry, reason: str, old: FileRow | None, removed_ids, report,
          retry: bool = False):  # fmt: skip
    if old is not None:  # the file changed into something we cannot read: its old vectors go
        removed_ids += catalog.delete_file(old.id)
    catalog.record_failure(entry, reason, retry=retry)
    report.failed_now += 1
    report.failures.append((show_path(entry.path), reason))


def align_audio(options: IndexOptions, progress: Progress | None = None) -> IndexReport:
    """Fit the audio projector afresh for this index's models and re-embed its audio files.

    Written as a new generation (the other files' vectors are copied over): killed, the index
    answers with the old projector as before, and running it again resumes."""
    started = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    col = Collection.open_writer(options.root_dir, options.name)
    try:
        if not col.encoder_identity:
            raise IndexNotFoundError(f"index {options.name!r} is empty: index some files first")
        encoder = _encoder_for(col, options)
        _attach_audio(col, encoder, options, progress, realign=True, record=False)
        col.begin_generation(encoder.identity, audio=encoder.audio.identity)
        if col.audio_identity is None:
            from ..encoders.audio import save_projector

            projector = encoder.audio.projector
            col.set_audio(encoder.audio.identity, lambda path: save_projector(projector, path))
        live = col.salvage
        done = col.catalog.files_under([b"/"])
        rows = [r for r in live.files_under([b"/"]).values() if r.path not in done]
        todo, gone = [], 0
        for row in rows:
            if row.modality != AUDIO:
                continue
            try:
                st = os.stat(row.path)
            except OSError:
                gone += 1
                continue
            todo.append((FileEntry(row.path, AUDIO, st.st_size, st.st_mtime_ns), None))
        if not done:  # a fresh generation: the failures stay recorded
            with col.catalog.transaction():
                col.catalog.copy_failures(live.all_failures())
        p = Plan(todo, 0, {}, [], carry=[r for r in rows if r.modality != AUDIO])
        report = IndexReport(removed=gone)
        settings = LoadSettings(modalities=frozenset({AUDIO}), audio=encoder.extras["audio_load"])
        # every recording is embedded afresh: no reuse of the vectors being replaced
        _apply(col, encoder, p, settings, options, report, progress, reuse_ok=False)
        report.updated, report.unchanged = report.added, 0
        report.added = 0
        _totals(col, report)
        report.notes = list(col.notes)
    finally:
        col.close()
    report.seconds = time.perf_counter() - started
    return report
