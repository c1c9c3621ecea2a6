"""Rehearsal: general pairs replayed in the training batches, so the fine-tuned model itself learns
the user's pairs without drifting on everything else (experience replay, as in continual learning;
for CLIP fine-tuning e.g. ZSCL, Zheng et al., ICCV 2023, and the rehearsal baselines they compare).

The retention pairs (`--retain`, or the set `retention` builds from the index) are split by file:
`REPLAY_SHARE` of the files are replayed, the others only measure forgetting and choose the WiSE-FT
mix, so the forgetting figure is measured on pairs the model never trained on. The split draws
runs of up to `BLOCK` consecutive files (in the order the pairs list them), not single files:
neighbours in a folder or a photo list are often one burst or one event, and one shot of a burst
on each side would make the measured forgetting look smaller than it is. With
`config.replay` = f > 0, each optimizer step takes round(f x batch) retention captions (at least
one) and fills the rest of the batch with the user's pairs: an epoch is still one pass over the
user's pairs, in more steps, and the retention captions are drawn in a seeded order per epoch,
every one before any repeats. They join the same contrastive batch (one InfoNCE): the user's
pairs and the general ones are each other's negatives. With f = 0 nothing changes: the whole
retention set measures, and training sees exactly the batches it saw before replay existed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .data import Split, retention_split
from .pairs import PairSet

REPLAY_SHARE = 0.5  # of the retention files, replayed when config.replay > 0
BLOCK = 10  # consecutive retention files that stay on one side of the split


@dataclass
class Retention:
    """The retention pairs of a run: where they came from, what they cost, which of them measure
    forgetting and which are replayed."""

    source: str | None  # what the pairs are (None: there are none)
    measure: Split | None  # chooses the WiSE-FT mix
    replay: Split | None  # mixed into the training batches
    fraction: float  # config.replay: the share of each batch replayed
    seconds: float = 0.0  # building the set: decoding, choosing pairs, frozen features
    per_step: int = 0  # replay captions per optimizer step
    samples: int = 0  # replay captions trained on
    mix_seconds: float = 0.0  # evaluating the WiSE-FT mixes (held-out and retention pairs)

    def to_dict(self) -> dict:
        def size(s: Split | None) -> dict:
            return {"pairs": len(s.file_of) if s else 0, "files": len(s.files) if s else 0}

        total = {k: size(self.measure)[k] + size(self.replay)[k] for k in ("pairs", "files")}
        return {
            "source": self.source, **total, "seconds": round(self.seconds, 2),
            "measured": size(self.measure),
            "replayed": {**size(self.replay), "fraction": self.fraction,
                         "per_step": self.per_step, "samples": self.samples},
            "mix_seconds": round(self.mix_seconds, 2),
        }  # fmt: skip

    def line(self) -> str:
        """One line for the report: the set, its cost, what measured and what was replayed."""
        d = self.to_dict()
        if self.source is None:
            return "retention set: none" + ("; nothing replayed" if self.fraction else "")
        m, r = d["measured"], d["replayed"]
        text = (f"retention set: {d['pairs']} pairs ({d['files']} files) from {self.source}, "
                f"{d['seconds']:.1f} s to prepare and {d['mix_seconds']:.1f} s to choose the mix; "
                f"{m['pairs']} pairs ({m['files']} files) measured")  # fmt: skip
        if not self.replay:
            return text + ", none replayed" + (" (too few files to split)" if self.fraction else "")
        return (f"{text}, {r['pairs']} others ({r['files']} files) replayed as {self.fraction:g} "
                f"of each batch ({self.per_step} a step, {self.samples} in all)")  # fmt: skip


def prepare(pairs, source, train: Split, val: Split, encode, prep, tokenizer, progress,
            started: float) -> Retention:  # fmt: skip
    """The Retention of `pairs` (a PairSet or None): split into measured and replayed files when
    `config.replay` > 0, decoded, tokenized, frozen features cached. `started`: when building the
    set began (time.perf_counter), for its cost."""
    config = encode.config
    measure_pairs, replay_pairs = pairs, None
    if pairs is not None and config.replay > 0 and len(pairs.files()) >= 4:
        measure_pairs, replay_pairs = split_in_runs(pairs, REPLAY_SHARE, config.seed)
    used = set(train.files) | set(val.files)
    measure = retention_split(measure_pairs, used, prep, tokenizer, config, progress)
    replay = retention_split(replay_pairs, used, prep, tokenizer, config, progress)
    if measure is None:
        source, replay = None, None  # nothing to choose the mix on: nothing replayed either
    splits = [s for s in (measure, replay) if s is not None]
    if splits:
        encode.cache_frozen_prefixes(*splits, progress=progress)
    return Retention(source, measure, replay, config.replay, time.perf_counter() - started)


def split_in_runs(pairs: PairSet, share: float, seed: int) -> tuple[PairSet, PairSet]:
    """(the rest, `share` of the files): runs of consecutive files (up to `BLOCK`, and at least
    four runs) drawn at random, each run wholly on one side."""
    files = list(dict.fromkeys(p.path for p in pairs.pairs))
    size = max(1, min(BLOCK, len(files) // 4))
    runs = [files[i : i + size] for i in range(0, len(files), size)]
    n = min(len(runs) - 1, max(1, round(share * len(runs))))
    drawn = {f for r in np.random.default_rng(seed).permutation(len(runs))[:n] for f in runs[r]}
    return (PairSet([p for p in pairs.pairs if p.path not in drawn]),
            PairSet([p for p in pairs.pairs if p.path in drawn]))  # fmt: skip


def per_step(fraction: float, step_size: int, replay: Split | None) -> int:
    """Replay captions per optimizer step of `step_size`: at least one when replaying, and at
    least one of the user's pairs left."""
    if replay is None or fraction <= 0:
        return 0
    return min(step_size - 1, max(1, round(fraction * step_size)))


def join(train: Split, replay: Split | None) -> Split:
    """What the training loop draws from: the user's captions, then the replayed ones (their
    files after the user's). `train` itself without replay; with it, `train` and `replay` hand
    their pixels and features over (one copy in memory: the training loop reads the joined
    split only)."""
    import torch

    if replay is None:
        return train

    def cat(a, b):
        if a is None or b is None:
            return None
        return np.concatenate([a, b]) if isinstance(a, np.ndarray) else torch.cat([a, b])

    joined = Split(
        files=train.files + replay.files,
        file_of=np.concatenate([train.file_of, replay.file_of + len(train.files)]),
        captions=train.captions + replay.captions,
        tokens=torch.cat([train.tokens, replay.tokens.to(train.tokens.device)]),
        pixels=cat(train.pixels, replay.pixels),
        image_prefix=cat(train.image_prefix, replay.image_prefix),
        text_prefix=cat(train.text_prefix, replay.text_prefix),
    )
    for split in (train, replay):
        split.pixels = split.image_prefix = split.text_prefix = None
    return joined


@dataclass
class Plan:
    """Which replay captions join each optimizer step (seeded per epoch and step, so a resumed
    run repeats them)."""

    per_step: int
    offset: int  # where the replay captions start in the joined split
    count: int  # replay captions
    steps: int  # optimizer steps per epoch
    seed: int
    _orders: dict = field(default_factory=dict, repr=False)  # per epoch

    def batch(self, idx: np.ndarray, epoch: int, step: int) -> np.ndarray:
        """The step's user captions `idx` with its replay captions, shuffled together (so that
        micro-batches of an accumulated step all hold some); `idx` itself without replay."""
        if not self.per_step:
            return idx
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch, 1])
            rounds = -(-self.steps * self.per_step // self.count)
            self._orders = {epoch: np.concatenate([rng.permutation(self.count)
                                                   for _ in range(rounds)])}  # fmt: skip
        take = self._orders[epoch][step * self.per_step : (step + 1) * self.per_step] + self.offset
        return np.random.default_rng([self.seed, epoch, step, 2]).permutation(
            np.concatenate([idx, take])
        )
