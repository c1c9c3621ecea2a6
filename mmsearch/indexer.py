"""Incremental indexing: walk the roots, embed new and changed files, drop vanished ones.

files -> loaders (worker processes) -> encoders -> catalog + vectors, committed in chunks so a run
killed at any point keeps what it committed and the next run resumes without duplicates.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .collection import AUDIO_PROJECTOR, Collection, model_cache_dir
from .config import DEFAULT_MODEL, IndexOptions, ModelSpec
from .encoders import Encoder, attach_audio, create_encoder, export_query_tower
from .errors import IndexNotFoundError, LoadError, ModelMismatchError
from .files import check_roots, walk
from .items import AUDIO, IMAGE, TEXT, FileEntry, IndexReport, Segment, show_path
from .loaders import Loaded, LoadSettings, load_file
from .loaders.text import chunk_note
from .store import FileRow

Progress = Callable[..., None]


@dataclass
class Plan:
    todo: list[tuple[FileEntry, FileRow | None]]  # new or changed files, with their old row
    unchanged: int
    vanished: dict[bytes, FileRow]  # indexed files under the roots that are gone
    vanished_failures: list[bytes]

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
        from .distributed import connect

        connect(options.ray)
    col = Collection.open_writer(options.root_dir, options.name)
    try:
        # With the index's own model, loading it (seconds of torch imports) waits until a file
        # actually needs embedding, so a run that finds nothing new is quick.
        eager = options.encoder.model is not None or options.rebuild or not col.encoder_identity
        encoder = _encoder_for(col, options) if eager else None
        report = _run(col, encoder, roots, options, progress)
    finally:
        col.close()
    report.seconds = time.perf_counter() - started
    return report


def _encoder_for(col: Collection, options: IndexOptions) -> Encoder:
    requested = options.encoder.model
    if requested is None:
        known = col.encoder_identity
        requested = ModelSpec.parse(known["spec"]) if known else ModelSpec.parse(DEFAULT_MODEL)
    encoder = create_encoder(requested, options.encoder)
    if options.rebuild:
        col.reset()
    else:
        col.check_encoder(encoder.identity)
    if not col.exists or "encoder" not in col.manifest:
        col.write_manifest(encoder=encoder.identity, name=col.name)
    export_query_tower(encoder, model_cache_dir(col.root_dir, encoder.identity["key"]))
    return encoder


def _attach_audio(
    col: Collection, encoder: Encoder, options: IndexOptions, progress, realign: bool = False
) -> None:
    """Load the audio tower for this index: --audio-model if given, else the audio model and
    projector of a fine-tuned --model directory if it has them, else the index's own. With
    `realign`, the projector is fitted afresh and replaces the index's one."""
    from .encoders.audio import (
        AUDIO_MODEL_DIRNAME,
        PROJECTOR_FILENAME,
        model_dir_audio_model,
        model_dir_of,
    )

    known = col.manifest.get("audio_encoder")
    model_dir = model_dir_of(encoder) if options.encoder.model is not None else None
    from_model_dir = model_dir is not None and (
        (model_dir / AUDIO_MODEL_DIRNAME).is_dir() or (model_dir / PROJECTOR_FILENAME).is_file()
    )
    requested = options.encoder.audio_model
    if requested is None and from_model_dir:
        requested = model_dir_audio_model(encoder)
    if requested is None and known:
        requested = known["spec"]
    stored = col.dir / AUDIO_PROJECTOR
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
            f"index {col.name!r} holds audio embedded with {known.get('spec')} (projector "
            f"{known.get('projector')}), not {identity['spec']} (projector "
            f"{identity['projector']}){source}. Use the index's audio model, re-align it with "
            f"`mmsearch align-audio --index {col.name}`, or rebuild with --rebuild"
        )
    if not known:
        from .encoders.audio import save_projector

        save_projector(encoder.audio.projector, stored)
        col.write_manifest(audio_encoder=identity)


def plan(col: Collection, entries: list[FileEntry], roots: list[bytes]) -> Plan:
    known = col.catalog.files_under(roots)
    failing = col.catalog.failures_under(roots)
    todo, unchanged = [], 0
    present = set()
    for e in entries:
        present.add(e.path)
        row = known.get(e.path)
        if row and row.size == e.size and row.mtime_ns == e.mtime_ns and row.modality == e.modality:
            unchanged += 1
        elif row or failing.get(e.path) != (e.size, e.mtime_ns):
            todo.append((e, row))  # new or changed (a file that failed is retried once changed)
    vanished = {p: r for p, r in known.items() if p not in present}
    gone_failures = [p for p in failing if p not in present]
    return Plan(todo, unchanged, vanished, gone_failures)


def _run(col: Collection, encoder, roots, options: IndexOptions, progress) -> IndexReport:
    progress("scan", 0, 0)
    entries = list(walk(roots, hidden=options.hidden, follow_links=options.follow_links))
    p = plan(col, entries, roots)
    report = IndexReport(unchanged=p.unchanged)
    if encoder is None and p.todo:
        encoder = _encoder_for(col, options)
    if encoder is None:  # nothing to embed: only removals
        encoder = Encoder(identity=col.encoder_identity, dim=col.dim)
    if encoder.audio is None and any(e.modality == AUDIO for e, _ in p.todo):
        _attach_audio(col, encoder, options, progress)
    settings = LoadSettings(
        image_prep=encoder.extras.get("prep"),
        audio=encoder.extras.get("audio_load"),
        modalities=frozenset(m for m in (IMAGE, TEXT, AUDIO) if getattr(encoder, m) is not None),
    )
    _apply(col, encoder, p, settings, options, report, progress)
    return _totals(col, report)


def _apply(col, encoder, p: Plan, settings, options, report, progress, reuse_ok=True) -> None:
    """Embed and commit `p.todo` chunk by chunk, drop `p.vanished`, save the vectors."""
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
    try:
        for loaded, embed in _chunks(col, encoder, p, settings, options):
            embedded = _commit_chunk(
                col, encoder, loaded, p, report, options, tick, reuse_ok, embed=embed
            )
            tick(len(loaded) - embedded)
        with col.catalog.transaction():
            removed_ids = []
            for row in p.vanished.values():
                removed_ids += col.catalog.delete_file(row.id)
                report.removed += 1
            for path in p.vanished_failures:
                col.catalog.clear_failure(path)
        vectors.remove(removed_ids)
    except BaseException:
        col.save_vectors()  # what was committed, as it is: no retraining on the way out
        raise
    col.save_vectors(options, progress)


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
    from .distributed import ray_chunks

    cache = model_cache_dir(col.root_dir, encoder.identity["key"])
    chunks = ray_chunks(todo, dict(p.vanished), encoder, settings, options, options.ray, cache)
    for loaded, results in chunks:

        def embed(items, tick, results=results):
            # A worker skips files whose content the index holds; should the commit still want
            # one embedded (its stored twin went meanwhile), it is embedded here.
            missing = [x for x in items if x.entry.path not in results]
            if missing:
                again = [load_file(x.entry, settings) for x in missing]
                done = _embed(encoder, [x for x in again if x.error is None], options.batch_size,
                              lambda n: None)  # fmt: skip
                fresh = iter(done)
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
    with ctx.Pool(workers) as pool:
        pending = None
        for i, chunk in enumerate(chunks):
            if pending is None:
                pending = pool.starmap_async(load_file, [(e, settings) for e, _ in chunk], 4)
            nxt = None
            if i + 1 < len(chunks):
                nxt = pool.starmap_async(load_file, [(e, settings) for e, _ in chunks[i + 1]], 4)
            yield pending.get()
            pending = nxt


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
    for i, x in enumerate(ok if reuse_ok else []):
        old = old_rows.get(x.entry.path)
        if old is not None and old.hash == x.hash:
            reuse[i] = old
            continue
        src = catalog.file_with_hash(x.hash, x.entry.modality)
        if src is not None:
            reuse[i] = src
    # 2. Embed the rest; identical files within the chunk are embedded once.
    fresh: dict[str, tuple[list[Segment], np.ndarray]] = {}
    failed: dict[int, str] = {}
    to_embed = [i for i in range(len(ok)) if i not in reuse]
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
            return _embed(encoder, items, options.batch_size, tick)

    embedded = embed([ok[i] for i in first_of_hash.values()], counted)
    for (digest, _i), result in zip(first_of_hash.items(), embedded, strict=True):
        if isinstance(result, str):
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
            if i in failed or (i not in reuse and x.hash not in fresh):
                reason = failed.get(i) or failed.get(first_of_hash.get(x.hash), "embedding failed")
                _fail(catalog, e, reason, old, removed_ids, report)
                continue
            catalog.clear_failure(e.path)
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
            if src is not None:
                units = catalog.units_of(src.id)
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
    return ticked


def _fail(catalog, entry: FileEntry, reason: str, old: FileRow | None, removed_ids, report):
    if old is not None:  # the file changed into something we cannot read: its old vectors go
        removed_ids += catalog.delete_file(old.id)
    catalog.record_failure(entry, reason)
    report.failed_now += 1
    report.failures.append((show_path(entry.path), reason))


def _embed(encoder: Encoder, items: list[Loaded], batch_size: int, tick) -> list:
    """(segments, vectors) per item, or a reason string for an item that could not be embedded.
    Calls `tick(n)` as files are done, once per file."""
    out: list = [None] * len(items)
    images = [i for i, x in enumerate(items) if x.entry.modality == IMAGE]
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        vecs = encoder.image.embed([items[i].payload for i in batch], batch_size)
        for j, i in enumerate(batch):
            out[i] = ([Segment()], vecs[j : j + 1])
        tick(len(batch))
    notes = [i for i, x in enumerate(items) if x.entry.modality == TEXT]
    if notes:
        tower = encoder.text
        limit = tower.context_length - 2
        texts, owners = [], []
        for i in notes:
            chunks = chunk_note(items[i].payload, tower.count_tokens, limit)
            if not chunks:
                out[i] = "empty note (no text)"
                continue
            if len(chunks) == 1:  # a one-chunk note is the whole file
                c = chunks[0]
                chunks = [Segment(c.start, c.end, c.text)]
            out[i] = (chunks, None)
            texts += [c.text for c in chunks]
            owners += [i] * len(chunks)
        if texts:
            vecs = encoder.text.embed(texts, batch_size)
            owners_arr = np.array(owners)
            for i in set(owners):
                segs = [Segment(s.start, s.end) for s in out[i][0]]
                out[i] = (segs, vecs[owners_arr == i])
        tick(len(notes))
    sounds = [i for i, x in enumerate(items) if x.entry.modality == AUDIO]
    for i in sounds:
        out[i] = _embed_recording(encoder, items[i].entry.path, batch_size)
        tick(1)
    return out


def align_audio(options: IndexOptions, progress: Progress | None = None) -> IndexReport:
    """Fit the audio projector afresh for this index's models and re-embed its audio files."""
    started = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    col = Collection.open_writer(options.root_dir, options.name)
    try:
        if not col.encoder_identity:
            raise IndexNotFoundError(f"index {options.name!r} is empty: index some files first")
        encoder = _encoder_for(col, options)
        _attach_audio(col, encoder, options, progress, realign=True)
        rows = [r for r in col.catalog.files_under([b"/"]).values() if r.modality == AUDIO]
        todo, gone = [], []
        for row in rows:
            try:
                st = os.stat(row.path)
            except OSError:
                gone.append(row)
                continue
            todo.append((FileEntry(row.path, AUDIO, st.st_size, st.st_mtime_ns), row))
        p = Plan(todo, 0, {r.path: r for r in gone}, [])
        report = IndexReport()
        settings = LoadSettings(modalities=frozenset({AUDIO}), audio=encoder.extras["audio_load"])
        # every recording is embedded afresh: no reuse of the vectors being replaced
        _apply(col, encoder, p, settings, options, report, progress, reuse_ok=False)
        _totals(col, report)
    finally:
        col.close()
    report.seconds = time.perf_counter() - started
    return report


def _embed_recording(encoder: Encoder, path: bytes, batch_size: int):
    """Decode and embed a recording window by window; (segments, vectors) or a failure reason."""
    from .loaders.audio import iter_windows

    segments, parts, batch = [], [], []
    try:
        for start, end, samples in iter_windows(path, **encoder.extras["audio_load"]):
            segments.append(Segment(start, end))
            batch.append(samples)
            if len(batch) == batch_size:
                parts.append(encoder.audio.embed(batch, batch_size))
                batch = []
    except LoadError as e:  # also when damage shows up halfway: the whole file fails
        return e.reason
    if batch:
        parts.append(encoder.audio.embed(batch, batch_size))
    if not segments:
        return "no audio samples"
    return segments, np.concatenate(parts)
