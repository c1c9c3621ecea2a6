"""Searcher: embed a query's terms, rank the index's vectors, shape the hits."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import EncoderOptions, ModelSpec, SearchOptions
from ..errors import ModelMismatchError, UsageError
from ..modalities import span_of
from ..records import MODALITIES, TEXT, Hit
from ..storage.calibration import Calibration
from ..storage.collection import Collection
from ..storage.layout import model_cache_dir
from .query import check_query, combine, query_modality
from .results import group_by_file, note_lines, renumber

ALLOWED_KEPT = 8  # (type, filters) id sets a Searcher keeps


class Searcher:
    """Answers queries against one index; keeps the index and towers loaded between queries."""

    def __init__(self, options: SearchOptions, towers_from: Searcher | None = None):
        """With `towers_from`, a Searcher of this index opened earlier (the index has changed
        since): its loaded towers are used when the model and audio model are the same."""
        self.options = options
        self.col = Collection.open_reader(options.root_dir, options.name)
        identity = self.col.encoder_identity
        if identity is None:
            self.col.close()
            raise UsageError(f"index {options.name!r} is empty: index some files first")
        self.identity = identity
        self._text = None
        self._full = None
        self._engine = None  # which engine answers (storage.vectors.engine), once chosen
        self._answerer = None  # its search object; None: the collection's faiss index
        self._resident = False  # warmed: a long-lived process, worth a GPU's start-up
        # Shared by this Searcher's copies (with_options, clone): what they all read alike.
        self._shared: dict[str, object] = {}  # "calibration" -> the index's Calibration
        self._embedded: dict[str, np.ndarray] = {}  # query text -> vector
        # (type, filters) -> ids they let through; shared by copies (a server's per-request ones)
        self._allowed: dict[tuple, object] = {}
        if towers_from is not None and self._same_model(towers_from):
            self._text, self._full = towers_from._text, towers_from._full

    def _same_model(self, other: Searcher) -> bool:
        same = other.identity.key == self.identity.key
        same = same and other._query_source() == self._query_source()
        return same and other.col.manifest.audio_encoder == self.col.manifest.audio_encoder

    def clone(self) -> Searcher:
        """This Searcher for another thread: the same towers and loaded vectors, its own catalog
        connection (a SQLite connection belongs to the thread that opened it). Call `warm`
        first, in this Searcher's thread, or each clone loads the vectors again."""
        other = self.with_options(self.options)
        other.col = self.col.clone()
        if other._answerer is not None:
            other._answerer = other._answerer.for_catalog(other.col.catalog)
        return other

    def with_options(self, options: SearchOptions) -> Searcher:
        """This Searcher with other search options (k, type, filters, ...): the same index, catalog
        connection (so: for this thread), towers and vectors; what filters let through is kept
        per (type, filters) and shared with it. Cheap: a server makes one per request."""
        other = copy.copy(self)
        other.options = options
        other._embedded = {}
        if options.query_model != self.options.query_model:
            other._text = None
        return other

    def warm(self) -> None:
        """Load the index's vectors now, not at the first query, where they are searched from:
        a warmed Searcher is a long-lived one, which a GPU pays off for (engine.choose)."""
        self._resident = True
        self._vectors()

    def close(self) -> None:
        self.col.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- towers -------------------------------------------------------------------------------
    def _full_encoder(self):
        """The torch encoder of the index's model (for image/audio queries, or no fast tower)."""
        if self._full is None:
            from ..encoders import create_encoder

            spec = ModelSpec.parse(self.identity.spec)
            enc = create_encoder(spec, EncoderOptions(device=self.options.device))
            if enc.identity.key != self.identity.key:
                raise ModelMismatchError(
                    f"the model at {self.identity.spec} changed since index "
                    f"{self.options.name!r} was built (weights {enc.identity.weights}, index "
                    f"has {self.identity.weights}); rebuild it with --rebuild"
                )
            audio = self.col.manifest.audio_encoder
            if audio:
                from ..encoders import attach_audio

                stored = self.col.projector_path
                attach_audio(
                    enc,
                    audio.spec,
                    model_cache_dir(self.col.root_dir, enc.identity.key),
                    projector=stored if stored.is_file() else None,
                )
                if enc.audio.identity.key != audio.key:
                    raise ModelMismatchError(
                        f"the audio model {audio.spec} changed since index "
                        f"{self.options.name!r} was built; re-align it: mmsearch align-audio"
                    )
            self._full = enc
        return self._full

    def _query_source(self) -> str | None:
        """The query tower asked for (--query-model), else the index's own (its manifest)."""
        return self.options.query_model or (self.col.manifest.query_tower or {}).get("source")

    def _text_tower(self):
        """The one place the tower for text queries is chosen: the query tower (another
        language's, `encoders.query_tower`; its torch-free copy once `index --query-model` exported
        it) when there is one, else the torch-free export of the model's text tower, else the
        model's own (already loaded for an image or sound query)."""
        if self._text is None:
            source = self._query_source()
            cache = model_cache_dir(self.col.root_dir, self.identity.key)
            if source is not None:
                from ..encoders import query_tower

                self._text = query_tower.load(
                    query_tower.resolve(source), self.identity, self.options.device, cache
                )
            elif self._full is None:
                from ..encoders import query_text_tower

                self._text = query_text_tower(cache)
        return self._text or self._full_encoder().text

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._text_tower().embed(texts)

    def embed_image(self, path: Path) -> np.ndarray:
        from ..errors import LoadError
        from ..loaders.image import load_image

        enc = self._full_encoder()
        try:
            arr = load_image(path, enc.prep)
        except LoadError as e:
            raise UsageError(f"cannot use {path} as a query image: {e.reason}") from None
        return enc.encode_image([arr])[0]

    def embed_audio(self, path: Path) -> np.ndarray:
        from ..errors import LoadError
        from ..loaders.audio import load_audio

        if not self.col.manifest.audio_encoder:
            raise UsageError(
                f"index {self.options.name!r} has no audio model yet: index some audio files "
                "first (mmsearch index PATH), then search with --audio"
            )
        enc = self._full_encoder()
        try:
            windows = load_audio(path, enc.audio_windows).windows
        except LoadError as e:
            raise UsageError(f"cannot use {path} as a query sound: {e.reason}") from None
        return combine(list(enc.encode_audio([w for _, _, w in windows])), [1.0] * len(windows))

    def prepare_texts(self, texts: list[str]) -> None:
        """Embed the texts not embedded yet, in one batch (a batch of queries embeds all its
        terms at once); query_vector then finds them. Kept for the Searcher's life: for a batch,
        not for every query a resident process answers."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._embedded]
        if todo:
            self._embedded.update(zip(todo, self.embed_texts(todo), strict=True))

    # --- search -------------------------------------------------------------------------------
    def query_vector(
        self, query: str | None, image: Path | None = None, audio: Path | None = None
    ) -> np.ndarray:
        terms = check_query(query, image, audio)
        vectors, weights = [], []
        if terms:
            # Each distinct text is embedded once, so a repeated term gets the very same vector;
            # only texts given to prepare_texts are kept (a resident process keeps no history).
            texts = [t for t in dict.fromkeys(t.text for t in terms) if t not in self._embedded]
            fresh = dict(zip(texts, self.embed_texts(texts), strict=True)) if texts else {}
            vectors += [self._embedded.get(t.text, fresh.get(t.text)) for t in terms]
            weights += [t.weight for t in terms]
        for path, embed in ((image, self.embed_image), (audio, self.embed_audio)):
            if path is not None:
                vectors.append(embed(Path(path)))
                weights.append(1.0)
        return combine(vectors, weights)

    def search(
        self,
        query: str | None = None,
        image: Path | None = None,
        audio: Path | None = None,
        k: int | None = None,
        modality: str | None = None,
        min_relevance: float | None = None,
    ) -> list[Hit]:
        """The top k hits, best first. `modality` "any" ranks every modality by relevance;
        hits below `min_relevance` are dropped (so a query about something absent from the
        index may get none)."""
        k = self.options.k if k is None else k
        if k < 1:
            raise UsageError("-k must be at least 1")
        modality = modality or self.options.modality
        if modality not in (*MODALITIES, "any"):
            raise UsageError(f"unknown --type {modality!r}; use {', '.join(MODALITIES)} or any")
        if min_relevance is None:
            min_relevance = self.options.min_relevance
        if min_relevance is not None and not 0.0 <= min_relevance <= 1.0:
            raise UsageError(f"--min-relevance must be between 0 and 1, not {min_relevance}")
        terms = check_query(query, image, audio)  # before a model loads
        q = self.query_vector(query, image, audio)
        exclude = None
        if self.options.exclude_self and (image is not None or audio is not None):
            exclude = self._copies_of([p for p in (image, audio) if p is not None])
        return self.rank(
            q, k, modality, exclude, query_modality(terms, image, audio), min_relevance
        )

    def _copies_of(self, paths: list[Path]) -> np.ndarray:
        """Unit ids of the query files and of their byte-identical copies in the index."""
        from ..loaders import file_hash
        from ..pipeline.walk import absolute

        found = [np.zeros(0, np.int64)]
        for path in paths:
            where = absolute(path)
            found.append(self.col.catalog.unit_ids_of_content(where, file_hash(where)))
        return np.unique(np.concatenate(found))

    def _vectors(self):
        """What answers vector searches: the engine chosen once per Searcher (faiss on the CPU or
        GPUs, or torch on a GPU; see storage.vectors.engine)."""
        if self._engine is None:
            from ..storage.vectors.engine import FAISS_CPU, open_engine

            self._engine, answerer = open_engine(self.col, self.options.device, self._resident)
            self._answerer = None if self._engine.name == FAISS_CPU else answerer
        return self.col.vectors if self._answerer is None else self._answerer

    @property
    def engine(self):
        """The engine that answers this Searcher's vector searches (an engine.Engine)."""
        self._vectors()
        return self._engine

    def calibration(self, modalities) -> Calibration:
        """The index's relevance calibration, covering `modalities` (calibration.covering)."""
        from ..storage import calibration

        # Kept where every copy finds it: a server makes a copy per request, and loading (or,
        # for an index without one, fitting) it each time cost more than the search.
        cal = calibration.covering(
            self.col, modalities, self._shared.get("calibration"), self.embed_texts
        )
        self._shared["calibration"] = cal
        return cal

    def allowed(self, modality: str = "any") -> np.ndarray | None:
        """The unit ids a search of `modality` may return (its type and the options' filters),
        or None for all. Applied inside the vector search, before the top k: a filter never
        loses results to -k. Read once per (type, filters) and kept for the next queries (a
        batch shares it); a few at a time, so a resident process varying them stays small."""
        flt = self.options.filters
        if modality == "any" and not flt:
            return None
        key = (modality, flt)
        if key not in self._allowed:
            if len(self._allowed) >= ALLOWED_KEPT:
                self._allowed.clear()
            kind = None if modality == "any" else modality
            self._allowed[key] = self.col.catalog.unit_ids_matching(kind, flt)
        return self._allowed[key]

    def _searched(self, modality: str) -> dict[str, np.ndarray | None]:
        """For each modality the index holds that a search of `modality` asks for: the ids it
        may return (None: every vector, when it is the only modality and nothing is filtered)."""
        key = ("kinds", modality, self.options.filters)
        if key not in self._allowed:
            wanted = MODALITIES if modality == "any" else [modality]
            if self.options.filters:
                kinds = {m: self.allowed(m) for m in wanted}
                kinds = {m: ids for m, ids in kinds.items() if len(ids)}
            else:  # counted first: a modality holding every vector needs no id list
                counts = self.col.catalog.units_by_modality()
                total = sum(counts.values())
                kinds = {
                    m: None if n == total else self.allowed(m)
                    for m in wanted
                    if (n := counts.get(m, 0))
                }
            self._allowed[key] = kinds
        return self._allowed[key]

    def rank(
        self,
        q: np.ndarray,
        k: int,
        modality: str = "any",
        exclude: np.ndarray | None = None,
        query_modality: str = TEXT,
        min_relevance: float | None = None,
    ) -> list[Hit]:
        """The top k hits for query vector q: each modality's best files (of `modality`, passing
        the filters, not units `exclude`) merged by relevance (`merge`), those below
        `min_relevance` dropped; with options.group, k files (each at its best segment)."""
        kinds = self._searched(modality)
        cal = self.calibration(kinds)
        skip = set() if exclude is None else set(exclude.tolist())
        want = k + len(skip)
        while True:
            found, deeper = {}, False
            for m, allowed in kinds.items():
                scores, ids = self._vectors().search(q, want, allowed)
                keep = np.array([i not in skip for i in ids.tolist()], bool)
                found[m] = (scores[keep], ids[keep])
                deeper = deeper or len(ids) == want
            n = sum(len(s) for s, _ in found.values())
            best = cal.merge(q, query_modality, found, n, min_relevance)
            rows = self.col.catalog.units([i for _, _, i, _ in best])
            # a vector without catalog row (a writer mid-commit) is left out
            hits = [
                Hit(0, score, r.path, r.modality, r.start, r.end, relevance=rel)
                for rel, score, uid, _ in best
                if (r := rows.get(uid)) is not None
            ]
            if self.options.group:
                hits = group_by_file(hits, k)
            # grouping folds a file's segments into one row: look deeper until k files
            if len(hits) >= k or not deeper:
                break
            want *= 4
        hits = renumber(hits[:k])
        if self.options.snippets:
            stat = {r.path: (r.size, r.mtime_ns) for r in rows.values()}
            hits = [
                replace(h, snippet=note_lines(h.path, h.start, h.end, *stat[h.path]))
                if span_of(h.modality) == "lines" and h.start is not None
                else h
                for h in hits
            ]
        return hits


def search(query: str | None = None, options: SearchOptions | None = None, **kw) -> list[Hit]:
    """One-shot search (opens the index, answers, closes)."""
    with Searcher(options or SearchOptions()) as s:
        return s.search(query, **kw)
