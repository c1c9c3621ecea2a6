"""Loaded files -> vectors: each file's (segments, vectors), or the reason it could not be embedded.

One function per modality (named in `modalities.TABLE`), dispatched by `embed_loaded`. Used by
the local indexing run (`indexer`) and by the Ray actors (`distributed`) alike, so both embed a
file the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from .encoders import Encoder
from .errors import LoadError
from .loaders import Loaded
from .loaders.text import chunk_note
from .modalities import TABLE, Modality
from .records import Segment

Tick = Callable[[int], None]
# Embeds loaded files of one modality: (encoder, items, batch_size, tick, out) fills out[i] with
# items[i]'s (segments, vectors) or failure reason as it goes, calling tick(n) as files are done.
EmbedFn = Callable[[Encoder, list[Loaded], int, Tick, list], None]


class Interrupted(Exception):
    """Ctrl-C while embedding: carries the results finished so far, to be committed."""

    def __init__(self, partial: list):
        self.partial = partial


def embed_loaded(encoder: Encoder, items: list[Loaded], batch_size: int, tick: Tick) -> list:
    """(segments, vectors) per item, or a reason string for an item that could not be embedded.
    Calls `tick(n)` as files are done, once per file. On Ctrl-C raises `Interrupted` with the
    results so far (None for an item not embedded yet)."""
    out: list = [None] * len(items)
    try:
        _embed_into(out, encoder, items, batch_size, tick)
    except KeyboardInterrupt:
        # notes whose chunks were cut but not embedded count as not done
        done = [None if isinstance(r, tuple) and r[1] is None else r for r in out]
        raise Interrupted(done) from None
    return out


def _embed_into(
    out: list, encoder: Encoder, items: list[Loaded], batch_size: int, tick: Tick
) -> None:
    # One modality after another, in the table's order; each fills its part of `out` as it goes.
    for modality in TABLE:
        where = [i for i, x in enumerate(items) if x.entry.modality == modality.name]
        if not where:
            continue
        part: list = [None] * len(where)
        try:
            _embedder(modality)(encoder, [items[i] for i in where], batch_size, tick, part)
        finally:  # also on Ctrl-C: what is done so far is kept
            for i, result in zip(where, part, strict=True):
                out[i] = result


def _embedder(modality: Modality) -> EmbedFn:
    return globals()[modality.embed]


def embed_images(
    encoder: Encoder, items: list[Loaded], batch_size: int, tick: Tick, out: list
) -> None:
    """One vector per image, in batches of `batch_size`."""
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        vecs = encoder.image.embed([x.payload for x in batch], batch_size)
        for j in range(len(batch)):
            out[start + j] = ([Segment()], vecs[j : j + 1])
        tick(len(batch))


def embed_notes(
    encoder: Encoder, items: list[Loaded], batch_size: int, tick: Tick, out: list
) -> None:
    """One vector per chunk of a note (chunks fit the text tower's context), line ranges as
    segments; a one-chunk note is the whole file."""
    tower = encoder.text
    limit = tower.context_length - 2
    texts, owners = [], []
    for i, x in enumerate(items):
        chunks = chunk_note(x.payload, tower.count_tokens, limit)
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
    tick(len(items))


def embed_recordings(
    encoder: Encoder, items: list[Loaded], batch_size: int, tick: Tick, out: list
) -> None:
    """Recordings one at a time, decoded window by window while they are embedded."""
    for i, x in enumerate(items):
        out[i] = _embed_recording(encoder, x.entry.path, batch_size)
        tick(1)


def _embed_recording(encoder: Encoder, path: bytes, batch_size: int):
    """Decode and embed a recording window by window; (segments, vectors) or a failure reason."""
    from .loaders.audio import iter_windows

    segments, parts, batch = [], [], []
    try:
        for start, end, samples in iter_windows(path, **asdict(encoder.audio_windows)):
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
