"""Loaded files -> vectors: each file's `Embedded` (segments, vectors), or the reason it could not
be embedded.

One function per modality (named in `modalities.TABLE`), dispatched by `embed_loaded`. Used by
the local indexing run (`indexer`) and by the Ray actors (`distributed`) alike, so both embed a
file the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np

from .encoders import Encoder
from .errors import LoadError
from .loaders import Loaded
from .loaders.text import chunk_note
from .modalities import AUDIO, TABLE, Modality
from .records import Segment

Tick = Callable[[int], None]
# Embeds loaded files of one modality: (encoder, items, batch_size, tick, out) fills out[i] with
# items[i]'s Embedded or failure reason as it goes, calling tick(n) as files are done.
EmbedFn = Callable[[Encoder, list[Loaded], int, Tick, list], None]


class Embedded(NamedTuple):
    """A file's units: where each lies in the file, their vectors, and what the user should
    know about a file embedded only in part (None when it is whole)."""

    segments: list[Segment]
    vectors: np.ndarray | None
    warning: str | None = None


class Interrupted(Exception):
    """Ctrl-C while embedding: carries the results finished so far, to be committed."""

    def __init__(self, partial: list):
        self.partial = partial


def embed_loaded(encoder: Encoder, items: list[Loaded], batch_size: int, tick: Tick) -> list:
    """An Embedded per item, or a reason string for an item that could not be embedded.
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
    """One vector per image, in batches of `batch_size`. JPEGs left as their bytes (the image
    tower is on a GPU) are decoded there, a batch ahead (loaders.gpu_jpeg); one that cannot be
    decoded fails alone, with its reason."""
    batches = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
    start = 0
    for batch, pictures in zip(batches, _pictures(encoder, batches), strict=True):
        ok = [j for j, p in enumerate(pictures) if not isinstance(p, str)]
        vecs = encoder.image.embed([pictures[j] for j in ok], batch_size) if ok else None
        for j in set(range(len(batch))) - set(ok):
            out[start + j] = pictures[j]  # why it could not be decoded
        for n, j in enumerate(ok):
            out[start + j] = Embedded([Segment()], vecs[n : n + 1])
        tick(len(batch))
        start += len(batch)


def _pictures(encoder: Encoder, batches: list[list[Loaded]]) -> Iterator[list]:
    from .loaders.image import JpegBytes

    if not any(isinstance(x.payload, JpegBytes) for b in batches for x in b):
        return ([x.payload for x in b] for b in batches)
    from .loaders.gpu_jpeg import pictures

    return pictures(batches, encoder.prep, str(getattr(encoder.image, "device", "cpu")))


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
        out[i] = Embedded(chunks, None)
        texts += [c.text for c in chunks]
        owners += [i] * len(chunks)
    if texts:
        vecs = encoder.text.embed(texts, batch_size)
        owners_arr = np.array(owners)
        for i in set(owners):
            segs = [Segment(s.start, s.end) for s in out[i][0]]
            out[i] = Embedded(segs, vecs[owners_arr == i])
    tick(len(items))


def embed_recordings(
    encoder: Encoder, items: list[Loaded], batch_size: int, tick: Tick, out: list
) -> None:
    """Recordings one at a time, decoded window by window while they are embedded."""
    for i, x in enumerate(items):
        try:
            out[i] = _embed_sound(encoder, x.entry.path, batch_size) or "no audio samples"
        except LoadError as e:  # also when damage shows up halfway: the whole file fails
            out[i] = e.reason
        tick(1)


def embed_videos(
    encoder: Encoder, items: list[Loaded], batch_size: int, tick: Tick, out: list
) -> None:
    """Videos one at a time: the frame kept for each shot through the image tower, the
    soundtrack (when the encoder has an audio tower) through the audio tower in the windows of
    a recording, as "audio" units. A damaged soundtrack leaves the frames; a video that stops
    decoding halfway keeps the shots before the damage and says so in the warning."""
    for i, x in enumerate(items):
        try:
            out[i] = _embed_video(encoder, x.entry.path, batch_size)
        except LoadError as e:
            out[i] = e.reason
        tick(1)


def _embed_video(encoder: Encoder, path: bytes, batch_size: int):
    from .loaders.ffmpeg import NoAudioStream
    from .loaders.video import VideoInfo, iter_shots

    info = VideoInfo()
    shots = iter_shots(path, encoder.prep, info=info)
    frames = _batched(((Segment(s.start, s.end), s.frame) for s in shots), batch_size)
    parts = [(segs, encoder.image.embed(pictures, batch_size)) for segs, pictures in frames]
    sound, deaf = None, None  # the soundtrack's units, or why it could not be embedded
    if encoder.audio is not None:
        try:
            sound = _embed_sound(encoder, path, batch_size, soundtrack=True)
        except NoAudioStream:
            pass  # a silent video
        except LoadError as e:
            deaf = e.reason
    if sound is not None:
        parts.append((sound.segments, sound.vectors))
    if not parts:  # no video stream, and no sound that could be embedded
        if deaf or encoder.audio is not None:
            return deaf or "no video or audio stream"
        return "no video stream (sound only, and no audio model)"
    warnings = info.notes + ([f"soundtrack not indexed: {deaf}"] if deaf else [])
    segments = [seg for segs, _ in parts for seg in segs]
    return Embedded(segments, np.concatenate([v for _, v in parts]), "; ".join(warnings) or None)


def _embed_sound(encoder: Encoder, path: bytes, batch_size: int, soundtrack: bool = False):
    """A recording's (or with `soundtrack`, a video's sound's) windows embedded as they are
    decoded: Embedded, or None when there are none. Raises LoadError."""
    from .loaders.audio import iter_windows

    windows = iter_windows(path, encoder.audio_windows, soundtrack=soundtrack)
    own = AUDIO if soundtrack else None  # a video's sound: audio units of a video file
    pieces = _batched(((Segment(a, b, modality=own), w) for a, b, w in windows), batch_size)
    parts = [(segs, encoder.audio.embed(samples, batch_size)) for segs, samples in pieces]
    if not parts:
        return None
    return Embedded([s for segs, _ in parts for s in segs], np.concatenate([v for _, v in parts]))


def _batched(pairs: Iterable[tuple], size: int) -> Iterator[tuple[list, list]]:
    """(firsts, seconds) of `pairs` in lists of up to `size`, as they come."""
    firsts, seconds = [], []
    for a, b in pairs:
        firsts.append(a)
        seconds.append(b)
        if len(firsts) == size:
            yield firsts, seconds
            firsts, seconds = [], []
    if firsts:
        yield firsts, seconds
