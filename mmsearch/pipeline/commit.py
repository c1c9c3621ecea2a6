"""Loading, embedding and committing in chunks: decode in worker processes, embed, and commit
each chunk to the catalog and vectors at a pace bounded in time (a killed run keeps what it
committed)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..config import IndexOptions
from ..embed import Embedded, Interrupted, embed_loaded
from ..encoders import Encoder
from ..loaders import Loaded, LoadSettings, load_file
from ..records import FileEntry, show_path
from ..storage.catalog import FileRow
from ..storage.layout import model_cache_dir
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

    cache = model_cache_dir(col.root_dir, encoder.identity.key)
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
    here with `encoder`).

    1. Vectors of identical content already in the index are reused (copies, moves, touched
       files), or, in a rebuild with the same model, copied from the old generation.
    2. The rest is embedded, identical files within the chunk once.
    3. The chunk is written in one transaction, then mirrored in the vector index. Ctrl-C while
       embedding: what is embedded is committed, then KeyboardInterrupt."""
    ok = [x for x in loaded if x.error is None]
    reuse, salvaged = _reusable(col, ok, p.old_rows) if reuse_ok else ({}, {})
    ticked = 0

    def counted(n: int) -> None:
        nonlocal ticked
        ticked += n
        tick(n)

    if embed is None:

        def embed(items, tick):
            return embed_loaded(encoder, items, options.batch_size, tick)

    done = _embed_once(ok, reuse.keys() | salvaged.keys(), embed, counted)
    writer = _ChunkWriter(col, p, report, encoder.dim)
    with col.catalog.transaction():
        for x in loaded:
            if x.error is not None:
                writer.not_loaded(x)
        for i, x in enumerate(ok):
            writer.loaded(x, reuse.get(i), salvaged.get(i), done.outcome(i, x.hash))
    writer.mirror()
    if done.interrupted:
        raise KeyboardInterrupt
    return ticked


def _reusable(col, ok, old_rows) -> tuple[dict[int, FileRow], dict[int, FileRow]]:
    """Per position in `ok`: the catalog row whose vectors it can keep or share (same content,
    same modality), and apart, the old generation's rows a same-model rebuild can copy."""
    reuse: dict[int, FileRow] = {}
    salvaged: dict[int, FileRow] = {}
    for i, x in enumerate(ok):
        old = old_rows.get(x.entry.path)
        if old is not None and old.hash == x.hash:
            reuse[i] = old
            continue
        src = col.catalog.file_with_hash(x.hash, x.entry.modality)
        if src is not None:
            reuse[i] = src
        elif col.salvage is not None:
            src = col.salvage.file_with_hash(x.hash, x.entry.modality)
            if src is not None:
                salvaged[i] = src
    return reuse, salvaged


@dataclass
class _Embedding:
    """What embedding a chunk gave, per content hash."""

    first_of_hash: dict[str, int]  # hash -> the position in `ok` that was embedded for it
    fresh: dict[str, Embedded] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # position -> reason
    not_done: set[str] = field(default_factory=set)  # interrupted before they were embedded
    interrupted: bool = False

    def outcome(self, i: int, digest: str) -> Embedded | str | None:
        """File i's vectors, or why it has none, or None: not embedded (reused, or stopped)."""
        if i in self.failed:
            return self.failed[i]
        if digest in self.fresh:
            return self.fresh[digest]
        if digest in self.first_of_hash and digest not in self.not_done:
            return self.failed.get(self.first_of_hash[digest], "embedding failed")
        return None


def _embed_once(ok, skip, embed, tick) -> _Embedding:
    """Embed the files of `ok` not in `skip`, each content once."""
    first_of_hash: dict[str, int] = {}
    for i in range(len(ok)):
        if i not in skip:
            first_of_hash.setdefault(ok[i].hash, i)
    done = _Embedding(first_of_hash)
    try:
        embedded = embed([ok[i] for i in first_of_hash.values()], tick)
    except Interrupted as stop:  # Ctrl-C: what is embedded is committed, then we stop
        embedded, done.interrupted = stop.partial, True
    for (digest, i), result in zip(first_of_hash.items(), embedded, strict=True):
        if result is None:
            done.not_done.add(digest)
        elif isinstance(result, str):
            done.failed[i] = result
        else:
            done.fresh[digest] = result
    return done


class _ChunkWriter:
    """Writes a chunk's files into the catalog (inside the caller's transaction), then mirrors
    the units it added and removed in the vector index."""

    def __init__(self, col, p: Plan, report, dim: int):
        self.col, self.catalog, self.p, self.report, self.dim = col, col.catalog, p, report, dim
        self.added: list[tuple[np.ndarray, np.ndarray]] = []
        self.removed: list[int] = []

    def not_loaded(self, x) -> None:
        old = self.p.old_rows.get(x.entry.path)
        if old is not None and old.needs_meta and same_stat(old, x.entry):
            self.report.unchanged += 1  # only its meta was to be read: it keeps its vectors
            return
        fail_file(self.catalog, x.entry, x.error, old, self.removed, self.report)

    def loaded(self, x, src: FileRow | None, salvaged: FileRow | None, outcome) -> None:
        """File x, decoded: sharing `src`'s vectors, copying `salvaged`'s, or embedded
        (`outcome`: its vectors, the reason it failed, or None when it was not reached)."""
        catalog, report, e = self.catalog, self.report, x.entry
        old = self.p.old_rows.get(e.path)
        if src is None and salvaged is None:
            if outcome is None:
                return  # interrupted before it was embedded: the next run does it
            if isinstance(outcome, str):
                fail_file(catalog, e, outcome, old, self.removed, report)
                return
        catalog.clear_failure(e.path)
        # indexed, but not all of it (a note over --max-note-bytes, a video damaged halfway)
        warning = x.warning or (outcome.warning if isinstance(outcome, Embedded) else None)
        if warning:
            catalog.record_failure(e, warning)
            report.partial.append((show_path(e.path), warning))
        if src is not None and old is not None and src.id == old.id:
            # touched, same content: nothing to embed (x.meta fills in what an index written by
            # an older mmsearch lacks)
            catalog.update_file(old.id, e, x.hash, x.meta)
            report.unchanged += 1
        elif src is not None and src.path in self.p.vanished and old is None:
            # a move: the old row takes the new path and keeps its vectors and ids
            catalog.update_file(src.id, e, x.hash, x.meta)
            del self.p.vanished[src.path]
            report.moved += 1
        else:
            self._store(x, old, *self._content(x, src, salvaged, outcome))

    def _content(self, x, src, salvaged, outcome) -> tuple[list, np.ndarray, object]:
        """(segments, vectors, meta) of file x: copied from a row holding the same bytes, or
        as embedded."""
        if src is None and salvaged is None:
            return outcome.segments, outcome.vectors, x.meta
        source, row = (self.catalog, src) if src is not None else (self.col.salvage, salvaged)
        units = source.units_of(row.id)
        vectors = np.stack([v for _, v in units]) if units else np.zeros((0, self.dim))
        return [s for s, _ in units], vectors, x.meta or source.file_meta(row.id)

    def _store(self, x, old: FileRow | None, segments, vectors, meta) -> None:
        if old is None:
            file_id = self.catalog.add_file(x.entry, x.hash, meta)
            self.report.added += 1
        else:
            self.catalog.update_file(old.id, x.entry, x.hash, meta)
            file_id = old.id
            self.report.updated += 1
        gone, new = self.catalog.replace_units(file_id, segments, vectors)
        self.removed += gone
        self.added.append((new, vectors))

    def mirror(self) -> None:
        self.col.vectors.remove(self.removed)
        for ids, vectors in self.added:
            self.col.vectors.add(ids, vectors)


def fail_file(catalog, entry: FileEntry, reason: str, old: FileRow | None, removed_ids, report,
          retry: bool = False):  # fmt: skip
    if old is not None:  # the file changed into something we cannot read: its old vectors go
        removed_ids += catalog.delete_file(old.id)
    catalog.record_failure(entry, reason, retry=retry)
    report.failed_now += 1
    report.failures.append((show_path(entry.path), reason))
