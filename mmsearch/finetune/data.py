"""The pairs a fine-tuning run trains and evaluates on: decoded once, split by file, tokenized."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoadError, UsageError
from ..records import IMAGE
from .evaluate import decode_images
from .pairs import UNDECODABLE, PairSet, Skipped, split_by_file


@dataclass
class Split:
    """One side of the split: distinct files, and per caption its file index and tokens."""

    files: list[Path]
    file_of: np.ndarray  # (n_captions,) int64
    captions: list[str]
    tokens: Any  # torch.LongTensor (n_captions, context)
    pixels: np.ndarray | None = None  # (n_files, H, W, 3) uint8 when cached
    image_prefix: Any = None  # frozen image-prefix features per file (torch, on device)
    text_prefix: Any = None  # frozen text-trunk features per caption (torch, on device)
    by_length: np.ndarray | None = None  # caption indices, shortest first


def prepare_data(pairs, val_pairs, prep, tokenizer, config, progress):
    """(train Split, val Split, skipped): the image pairs of `pairs` (and `val_pairs`), with the
    files that do not decode skipped; without `val_pairs`, `config.val_fraction` of the files is
    held out. Raises UsageError when too little is left to train and evaluate."""
    skipped = list(pairs.skipped) + (list(val_pairs.skipped) if val_pairs is not None else [])
    # Audio pairs are not skipped: `finetune.audio.train_audio_projector` trains them (the CLI
    # runs it after this), so they are neither used nor counted here.
    image_pairs = pairs.of(IMAGE).pairs
    val_image_pairs = val_pairs.of(IMAGE).pairs if val_pairs is not None else []
    files = list(dict.fromkeys([p.path for p in image_pairs] + [p.path for p in val_image_pairs]))
    if not files:
        raise UsageError("no usable image pairs to train on" + skip_note(skipped))
    decoded, bad, keep_pixels = _decode_all(files, prep, config, progress)
    for p in image_pairs + val_image_pairs:
        if p.path in bad:
            skipped.append(Skipped(str(p.path), f"{UNDECODABLE}: {bad[p.path]}"))
    image_pairs = [p for p in image_pairs if p.path not in bad]
    val_image_pairs = [p for p in val_image_pairs if p.path not in bad]
    if val_pairs is None:
        image_pairs, val_image_pairs = _hold_out(image_pairs, config, skipped)
    else:
        overlap = {p.path for p in image_pairs} & {p.path for p in val_image_pairs}
        if overlap:
            raise UsageError(
                f"{len(overlap)} files appear in both the training and the validation pairs"
            )
    if len({p.path for p in image_pairs}) < 2 or not val_image_pairs:
        raise UsageError("too few usable pairs to train and evaluate" + skip_note(skipped))
    pixels = decoded if keep_pixels else None
    train, val = _split(image_pairs, tokenizer, pixels), _split(val_image_pairs, tokenizer, pixels)
    if not keep_pixels:
        progress(
            "warning",
            message=f"decoded images exceed {config.image_cache_mb} MB; decoding per batch",
        )
    return train, val, skipped


def retention_split(retain, exclude: set, prep, tokenizer, config, progress):
    """The image pairs of `retain` (general pairs whose recall must not degrade) whose files are
    not in `exclude` (trained or held out), decoded and tokenized; None without such pairs (or
    with fewer than two decodable files)."""
    if retain is None:
        return None
    image_pairs = [p for p in retain.of(IMAGE).pairs if p.path not in exclude]
    files = list(dict.fromkeys(p.path for p in image_pairs))
    decoded, bad, keep_pixels = _decode_all(files, prep, config, progress)
    image_pairs = [p for p in image_pairs if p.path not in bad]
    if len({p.path for p in image_pairs}) < 2:
        return None
    return _split(image_pairs, tokenizer, decoded if keep_pixels else None)


def _decode_all(files, prep, config, progress):
    """Decode every file once: bad ones are found before training, and the pixels are kept in
    memory while they fit the budget (else they are decoded again per batch).
    ({path: pixels}, {path: why it failed}, whether all pixels are kept)."""
    decoded: dict[Path, np.ndarray] = {}
    bad: dict[Path, str] = {}
    budget, used = config.image_cache_mb * 2**20, 0
    for s in range(0, len(files), 256):
        part = files[s : s + 256]
        for path, arr in zip(part, decode_images(part, prep, config.workers), strict=True):
            if isinstance(arr, LoadError):
                bad[path] = arr.reason
                continue
            used += arr.nbytes
            decoded[path] = arr if used <= budget else None
        progress("decode", done=min(s + 256, len(files)), total=len(files))
    return decoded, bad, used <= budget


def _hold_out(image_pairs, config, skipped):
    """Split the pairs by file into (train, val) pairs; at least two files on each side."""
    train_side, val_side = split_by_file(PairSet(image_pairs), config.val_fraction, config.seed)
    if len(val_side.files()) < 2 or len(train_side.files()) < 2:
        raise UsageError(
            f"{len(train_side.files()) + len(val_side.files())} usable files are too few to hold "
            "out a validation split (need --val-fraction > 0 and at least 4 files, or separate "
            "validation pairs)" + skip_note(skipped)
        )
    return train_side.pairs, val_side.pairs


def _split(side, tokenizer, pixels: dict | None) -> Split:
    side_files = list(dict.fromkeys(p.path for p in side))
    index = {f: i for i, f in enumerate(side_files)}
    captions = [p.caption for p in side]
    return Split(
        files=side_files,
        file_of=np.array([index[p.path] for p in side], dtype=np.int64),
        captions=captions,
        tokens=tokenizer(captions),
        pixels=np.stack([pixels[f] for f in side_files]) if pixels is not None else None,
    )


def fingerprint(*splits: Split) -> str:
    """What a checkpoint was trained on: files, captions and their split (train, val, and the
    replayed retention pairs when there are)."""
    h = hashlib.sha256()
    for split in splits:
        for f in split.files:
            h.update(os.fsencode(f) + b"\0")
        h.update(split.file_of.tobytes())
        for c in split.captions:
            h.update(c.encode() + b"\0")
        h.update(b"|")
    return h.hexdigest()[:16]


def counts(skipped: list[Skipped]) -> dict[str, int]:
    """Skipped pairs per reason kind."""
    out: dict[str, int] = {}
    for s in skipped:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


def skip_note(skipped) -> str:
    c = counts(skipped)
    return f" (skipped: {', '.join(f'{v} {k}' for k, v in c.items())})" if c else ""


def captions_by_file(split: Split) -> list[np.ndarray]:
    """Per file of `split`, the indices of its captions."""
    order = np.argsort(split.file_of, kind="stable")
    bounds = np.searchsorted(split.file_of[order], np.arange(len(split.files) + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(len(split.files))]
