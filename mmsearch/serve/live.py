"""The indexes a server answers from, kept loaded and current.

A LiveIndex holds one snapshot of an index: a Searcher with its vectors loaded. A watcher thread
notices a concurrent `mmsearch index` run's commits (the catalog's generation moves) and a
finished run or rebuild (manifest.json is replaced), opens a new snapshot beside the one answering
and swaps it in: queries never wait for a reopen, and the index run is never blocked (readers of a
WAL database do not block its writer). A SQLite connection belongs to the thread that opened it,
so each request thread searches through its own clone of the snapshot's Searcher, which has its
own catalog connection and shares the snapshot's vectors and towers (Searcher.clone).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import SearchOptions
from ..errors import MMSearchError
from ..records import Hit
from ..search import Searcher, combine
from ..storage.layout import MANIFEST
from ..storage.vectors.faiss_index import search_on_one_thread
from .encoder import EncoderThread

POLL_S = 1.0  # how often the watcher looks at the manifest and the catalog's generation
# While an index run commits, reopen at most every REOPEN_SPACING times the last reopen took
# (rebuilding 1M vectors from the catalog takes a while; 10k take milliseconds).
REOPEN_SPACING = 4.0
WAIT_FOR_REOPEN_S = 30.0  # a request that found its snapshot's files gone waits this long at most


class IndexUnavailable(MMSearchError):
    """The index cannot be read at the moment (a rebuild is replacing its files): a 503."""


class ServedSearcher(Searcher):
    """A Searcher whose towers run on the encoder thread.

    The snapshot's own instance holds the towers (loaded there, on first use). Its clones, one per
    request thread, rank in that thread and hand embedding to the encoder thread, which runs the
    snapshot instance's towers: a model is loaded once, whatever the number of threads."""

    def __init__(self, options: SearchOptions, encoder: EncoderThread, towers_from=None):
        super().__init__(options, towers_from)
        self.encoder = encoder
        self.model = self  # the instance whose towers embed (clones keep pointing here)

    def embed_texts(self, texts: list[str]):
        return self.encoder.texts(self.model._own_embed_texts, texts)

    def _own_embed_texts(self, texts: list[str]):
        return Searcher.embed_texts(self, texts)

    def embed_image(self, path: Path):
        return self.encoder.call(Searcher.embed_image, self.model, path)

    def embed_audio(self, path: Path):
        return self.encoder.call(Searcher.embed_audio, self.model, path)


def _signature(searcher: Searcher) -> tuple:
    """What changes when the index does: manifest.json (replaced by a finished run or rebuild)
    and the catalog's generation (moved by every commit)."""
    try:
        st = os.stat(searcher.col.dir / MANIFEST)
        manifest = (st.st_ino, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        manifest = None
    return manifest, searcher.col.catalog.generation()


@dataclass
class Snapshot:
    searcher: ServedSearcher  # opened on the watcher thread; request threads use clones
    signature: tuple
    opened_at: float  # time.monotonic()
    took: float  # seconds the opening took
    info: dict | None = field(default=None, repr=False)  # counts, made on first request


class LiveIndex:
    """One served index: a snapshot answering queries, replaced when the index changes."""

    def __init__(self, options: SearchOptions, encoder: EncoderThread, poll_s: float = POLL_S):
        self.options = options
        self.name = options.name
        self.encoder = encoder
        self.poll_s = poll_s
        self.problem: str | None = None  # why the last reopen failed (the old snapshot answers)
        self.reopened = 0
        self._snap: Snapshot | None = None
        self._local = threading.local()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by a request that found the snapshot's files gone
        self._checked = threading.Condition()  # notified after each look at the index
        self._checks = 0
        ready: Future = Future()
        self._thread = threading.Thread(
            target=self._watch, args=(ready,), name=f"mmsearch-watch-{self.name}", daemon=True
        )
        self._thread.start()
        ready.result()  # the first opening's error (no such index, ...) is raised here

    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    # --- in request threads ---------------------------------------------------------------------
    def searcher(self) -> Searcher:
        """The calling thread's clone of the current snapshot's Searcher."""
        snap, local = self._snap, self._local
        if getattr(local, "snap", None) is not snap:
            search_on_one_thread()
            try:
                searcher = snap.searcher.clone()
            except (sqlite3.Error, OSError):  # a rebuild just replaced the snapshot's files
                snap = self._newer_than(snap)
                searcher = snap.searcher.clone()
            old = getattr(local, "searcher", None)
            local.searcher, local.snap = searcher, snap
            if old is not None:
                old.close()
        return local.searcher

    def _newer_than(self, stale: Snapshot) -> Snapshot:
        """Wake the watcher to reopen the index now; the new snapshot, or IndexUnavailable."""
        with self._checked:
            checks = self._checks
            self._wake.set()
            self._checked.wait_for(lambda: self._checks > checks, timeout=WAIT_FOR_REOPEN_S)
        if self._snap is stale:
            raise IndexUnavailable(
                f"index {self.name!r} is being replaced and cannot be read now"
                + (f" ({self.problem})" if self.problem else "")
                + "; try again in a moment"
            )
        return self._snap

    def search(self, fields: dict, query: str | None, image=None, audio=None) -> list[Hit]:
        """Searcher.search with this request's SearchOptions `fields` (k, modality, filters,
        ...) over the index's own (name, root, device)."""
        searcher = self.searcher().with_options(replace(self.options, **fields))
        return searcher.search(query, image=image, audio=audio)

    def like(self, fields: dict, vectors, modality: str) -> list[Hit]:
        """The hits nearest to stored vectors (a file's, or one part of it, of `modality`):
        'more like this'."""
        searcher = self.searcher().with_options(replace(self.options, **fields))
        options = searcher.options
        q = combine(list(vectors), [1.0] * len(vectors))
        return searcher.rank(q, options.k, options.modality, None, modality, options.min_relevance)

    def info(self) -> dict:
        """What /api/indexes says of this index (counted once per snapshot)."""
        col = self.searcher().col
        snap = self._local.snap  # the snapshot `col` belongs to
        if snap.info is None:
            counts = col.catalog.counts()
            audio = col.manifest.audio_encoder
            snap.info = {
                "name": self.name,
                "model": snap.searcher.identity.spec,
                "audio_model": audio.spec if audio else None,
                "files": counts["files"],
                "vectors": counts["vectors"],
                "modalities": counts["by_modality"],
                "updated": col.manifest.updated,
            }
        return {**snap.info, "problem": self.problem}

    # --- on the watcher thread ------------------------------------------------------------------
    def _watch(self, ready: Future) -> None:
        try:
            snap = self._open(None)
        except BaseException as e:  # noqa: BLE001 - raised again in the constructor's thread
            ready.set_exception(e)
            return
        self._snap = snap
        ready.set_result(None)
        try:
            while not self._stop.is_set():
                urgent = self._wake.wait(self.poll_s)
                self._wake.clear()
                if self._stop.is_set():
                    break
                snap = self._refresh(snap, urgent)
                with self._checked:
                    self._checks += 1
                    self._checked.notify_all()
        finally:
            snap.searcher.close()

    def _refresh(self, snap: Snapshot, urgent: bool = False) -> Snapshot:
        try:
            signature = _signature(snap.searcher)
            if signature == snap.signature and not urgent:
                return snap
            commits_only = signature[0] == snap.signature[0]
            spaced = time.monotonic() - snap.opened_at >= REOPEN_SPACING * snap.took
            if commits_only and not spaced and not urgent:
                return snap
            new = self._open(snap)
        except (MMSearchError, OSError, sqlite3.Error) as e:
            self.problem = f"cannot reopen index {self.name!r} ({e}); answering from what it held"
            return snap
        self._snap, self.problem = new, None
        self.reopened += 1
        snap.searcher.close()  # clones in request threads have their own connections
        return new

    def _open(self, previous: Snapshot | None) -> Snapshot:
        start = time.monotonic()
        towers = previous.searcher if previous is not None else None
        searcher = ServedSearcher(self.options, self.encoder, towers_from=towers)
        try:
            signature = _signature(searcher)  # before loading: a commit meanwhile reopens again
            searcher.warm()  # the vectors, loaded here, on the thread that owns the connection
        except BaseException:
            searcher.close()
            raise
        now = time.monotonic()
        return Snapshot(searcher, signature, now, now - start)
