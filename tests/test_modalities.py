"""The modality table is the one place each modality is declared: the rest reads it."""

from __future__ import annotations

import dataclasses
import inspect

from mmsearch import embed, loaders
from mmsearch import records as items
from mmsearch.encoders import Encoder
from mmsearch.modalities import BY_EXTENSION, MODALITIES, TABLE, span_of


def test_every_entry_names_an_embed_function_and_an_encoder_tower():
    towers = {f.name for f in dataclasses.fields(Encoder)}
    for m in TABLE:
        fn = getattr(embed, m.embed)
        assert inspect.isfunction(fn) and fn.__module__ == "mmsearch.embed", m.name
        assert list(inspect.signature(fn).parameters) == [
            "encoder", "items", "batch_size", "tick", "out"
        ]  # fmt: skip
        assert m.tower in towers and m.also in (None, *towers), m.name
        assert m.span in ("none", "lines", "seconds")


def test_extensions_belong_to_one_modality_and_drive_the_loaders():
    seen: dict[str, str] = {}
    for m in TABLE:
        for ext in m.extensions:
            assert ext.startswith(".") and ext == ext.lower(), ext
            assert ext not in seen, f"{ext} in both {seen.get(ext)} and {m.name}"
            seen[ext] = m.name
    assert BY_EXTENSION == seen
    assert loaders.modality_of(b"/x/Photo.JPG") == "image"
    assert loaders.modality_of("notes/a.md") == "text"
    assert loaders.modality_of("song.m4a") == "audio"  # through PyAV
    assert loaders.modality_of("IMG_0001.HEIC") == "image"
    assert loaders.modality_of("clip.webm") == "video"
    assert loaders.modality_of("clip.xyz") is None


def test_names_are_the_ones_stored_and_shown():
    assert MODALITIES == ("image", "text", "audio", "video") == items.MODALITIES
    assert (items.IMAGE, items.TEXT, items.AUDIO, items.VIDEO) == MODALITIES
    assert [span_of(m) for m in MODALITIES] == ["none", "lines", "seconds", "seconds"]
    assert span_of("from-a-newer-version") == "lines"
