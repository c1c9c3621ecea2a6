"""Loading, embedding and committing in chunks: decode in worker processes, embed, and commit
each chunk to the catalog and vectors at a pace bounded in time (a killed run keeps what it
committed)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator

import numpy as np

from ..config import IndexOptions
from ..embed import Embedded, Interrupted, embed_loaded
from ..encoders import Encoder
from ..loaders import Loaded, LoadSettings, load_file
from ..records import FileEntry, show_path
from ..storage.catalog import FileRow
from ..storage.collection import model_cache_dir
from .plan import Plan, same_stat

Progress = Callable[..., None]


def default_workers() -> int:
    # Encoding takes the cores; one decoder per spare core keeps it fed (more starves the encoder).
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class Pacer:
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


def embedded_chunks(col, encoder, p: Plan, settings: LoadSettings, options: IndexOptions):
    """(loaded files, embed function) per chunk to commit: decoded here and embedded by
    `commit_chunk`, or hashed, decoded and embedded on a Ray cluster (`options.ray`)."""
    todo = p.todo
    if options.ray is None or not todo:
        for loaded in load_chunks(todo, settings, options):
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


def load_chunks(todo, settings: LoadSettings, options: IndexOptions) -> Iterator[list[Loaded]]:
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


def commit_chunk(
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
    fresh: dict[str, Embedded] = {}
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
            old = old_rows.get(x.entry.path)
            if x.error is None:
                continue
            if old is not None and old.needs_meta and same_stat(old, x.entry):
                report.unchanged += 1  # only its meta was to be read: it keeps its vectors
                continue
            fail_file(catalog, x.entry, x.error, old, removed_ids, report)
        for i, x in enumerate(ok):
            e, old = x.entry, old_rows.get(x.entry.path)
            if i not in reuse and x.hash in not_done:
                continue  # interrupted before it was embedded: the next run does it
            if i in failed or (i not in reuse and i not in salvaged and x.hash not in fresh):
                reason = failed.get(i) or failed.get(first_of_hash.get(x.hash), "embedding failed")
                fail_file(catalog, e, reason, old, removed_ids, report)
                continue
            catalog.clear_failure(e.path)
            # indexed, but not all of it (a note over --max-note-bytes, a video damaged halfway)
            warning = x.warning or (fresh[x.hash].warning if x.hash in fresh else None)
            if warning:
                catalog.record_failure(e, warning)
                report.partial.append((show_path(e.path), warning))
            src = reuse.get(i)
            if src is not None and old is not None and src.id == old.id:
                # touched, same content: nothing to embed (x.meta fills in what an index
                # written by an older mmsearch lacks)
                catalog.update_file(old.id, e, x.hash, x.meta)
                report.unchanged += 1
                continue
            if src is not None and src.path in p.vanished and old is None:
                # a move: the old row takes the new path and keeps its vectors and ids
                catalog.update_file(src.id, e, x.hash, x.meta)
                del p.vanished[src.path]
                report.moved += 1
                continue
            meta = x.meta
            if src is not None or i in salvaged:
                source, source_id = (catalog, src.id) if src else (col.salvage, salvaged[i].id)
                units = source.units_of(source_id)
                segments = [s for s, _ in units]
                vecs = np.stack([v for _, v in units]) if units else np.zeros((0, encoder.dim))
                meta = meta or source.file_meta(source_id)  # same bytes, same meta
            else:
                segments, vecs = fresh[x.hash].segments, fresh[x.hash].vectors
            if old is None:
                file_id = catalog.add_file(e, x.hash, meta)
                report.added += 1
            else:
                catalog.update_file(old.id, e, x.hash, meta)
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


def fail_file(catalog, entry: FileEntry, reason: str, old: FileRow | None, removed_ids, report,
          retry: bool = False):  # fmt: skip
    if old is not None:  # the file changed into something we cannot read: its old vectors go
        removed_ids += catalog.delete_file(old.id)
    catalog.record_failure(entry, reason, retry=retry)
    report.failed_now += 1
    report.failures.append((show_path(entry.path), reason))
