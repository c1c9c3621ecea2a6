"""What a fine-tuning run is told (FinetuneConfig) and what it reports (FinetuneResult)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MODEL
from ..errors import UsageError
from .evaluate import Recall

METHODS = ("head", "lora", "lock-image", "full")
DEFAULT_LR = {"head": 1e-3, "lora": 3e-4, "lock-image": 5e-5, "full": 1e-5}
# open_clip transformer blocks (attn.in_proj_weight, attn.out_proj, mlp.c_fc, mlp.c_proj), Hugging
# Face BERT-style towers (query/key/value/dense) and timm ViTs (qkv/proj/fc1/fc2).
DEFAULT_LORA_TARGETS = (
    "in_proj", "out_proj", "c_fc", "c_proj", "query", "key", "value", "dense", "qkv", "fc1", "fc2",
)  # fmt: skip
FORMAT_VERSION = 1  # of checkpoints, the training log and cached features
# Fields that may differ between a run and its --resume (they do not change what is computed).
RESUME_FREE = frozenset(
    {"resume", "overwrite", "device", "precision", "workers", "image_cache_mb", "plot",
     "keep_checkpoint", "checkpoint_every", "out", "feature_cache", "max_forgetting"}
)  # fmt: skip


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs besides the pairs. Built once at the CLI edge."""

    model: str = DEFAULT_MODEL  # open_clip name[:tag], hf-hub:org/repo or a model directory
    out: Path = Path("models/finetuned")
    method: str = "head"  # head | lora | lock-image | full
    epochs: int = 5
    batch_size: int = 64  # per forward pass; the contrastive batch is batch_size * grad_accum
    lr: float | None = None  # None: DEFAULT_LR[method]
    weight_decay: float = 0.1
    warmup_steps: int | None = None  # None: warmup_fraction of all optimizer steps
    warmup_fraction: float = 0.1
    min_lr_fraction: float = 0.0  # cosine decays to lr * this
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    val_fraction: float = 0.1  # of the files (not pairs) held out, when no val pairs are given
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: 2 * rank
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    unlocked_text_layers: int | None = None  # lock-image: train only the text tower's last N blocks
    unlocked_image_layers: int = 0  # lock-image: the image tower's last N layer groups train too
    grad_checkpointing: bool = False
    # auto: mixed precision on CUDA (bf16 where supported, else fp16) and on CPUs with native
    # bf16, fp32 elsewhere; or fp32 | bf16 | fp16 (autocast; fp16 adds loss scaling). Master
    # weights and optimizer state stay fp32 either way.
    precision: str = "auto"
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False  # replace an existing model or stale checkpoint in `out`
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: at each epoch end only
    keep_checkpoint: bool = False  # keep out/checkpoint after a finished run
    # Decoded images stay in memory up to this size; beyond it they are decoded per batch.
    image_cache_mb: int = 4096
    # Where features of frozen tower parts (e.g. a locked image trunk) are kept between runs, so
    # another run on the same files and base skips recomputing them. None: not kept.
    feature_cache: Path | None = None
    # Each epoch visits every file once with one of its captions (seeded draw), instead of every
    # pair: epochs cost the same whatever the number of captions per file.
    one_caption_per_file: bool = False
    workers: int | None = None  # image decoding threads; None: the core count (at most 8)
    # With retention pairs: the largest relative drop of their mean recall that the kept
    # WiSE-FT mix of base and fine-tuned weights may cost (`finetune.wise`).
    max_forgetting: float = 0.05
    # With retention pairs: the share of each training batch taken from them (half of their
    # files are replayed, the other half measure forgetting; `finetune.replay`). 0: none.
    replay: float = 0.5
    plot: bool = True

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if self.feature_cache is not None:
            object.__setattr__(self, "feature_cache", Path(self.feature_cache).expanduser())
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        checks = [
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 2, "--batch-size must be at least 2 (contrastive loss needs negatives)"),
            (self.lr is None or self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must not be negative"),
            (0 <= self.warmup_fraction < 1, "--warmup-fraction must be in [0, 1)"),
            (0 <= self.min_lr_fraction <= 1, "--min-lr-fraction must be in [0, 1]"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.lora_rank >= 1, "--lora-rank must be at least 1"),
            (bool(self.lora_targets), "--lora-targets must name at least one layer"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "--precision must be auto, fp32, bf16 or fp16"),
            (self.checkpoint_every >= 0, "--checkpoint-every must not be negative"),
            (0 <= self.max_forgetting <= 1, "--max-forgetting must be in [0, 1]"),
            (0 <= self.replay < 1, "--replay must be in [0, 1)"),
            (self.unlocked_text_layers is None or self.method == "lock-image",
             "--unlocked-text-layers goes with --method lock-image"),
            (self.unlocked_image_layers >= 0, "--unlocked-image-layers must not be negative"),
            (self.unlocked_image_layers == 0 or self.method == "lock-image",
             "--unlocked-image-layers goes with --method lock-image"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["feature_cache"] = str(self.feature_cache) if self.feature_cache else None
        d["lora_targets"] = list(self.lora_targets)
        return d


@dataclass
class FinetuneResult:
    """What a run did. `model` is the tuned open_clip model in memory (best epoch, merged, CPU,
    eval mode): the same weights as the directory `out`."""

    out: Path
    method: str
    before: Recall
    after: Recall  # the kept (best) epoch
    best_epoch: int  # 0: no epoch beat the model before training, which was kept
    epochs: int
    history: list[dict]
    skipped: dict[str, int]
    train_pairs: int
    train_files: int
    val_pairs: int
    val_files: int
    samples_per_s: float
    train_seconds: float
    curve: Path | None = None
    model: Any = field(default=None, repr=False, compare=False)
    note: str | None = None  # e.g. --resume found no checkpoint and started from the beginning
    # features of frozen parts read from the feature cache and computed, per tower
    feature_cache: dict = field(default_factory=dict)
    mix: Any = None  # wise.MixReport: the WiSE-FT mix kept, and what it was chosen from
    retention: Any = None  # replay.Retention: where the retention pairs came from, their cost

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "method": self.method,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "skipped": self.skipped,
            "train_pairs": self.train_pairs,
            "train_files": self.train_files,
            "val_pairs": self.val_pairs,
            "val_files": self.val_files,
            "samples_per_s": round(self.samples_per_s, 2),
            "train_seconds": round(self.train_seconds, 2),
            "curve": str(self.curve) if self.curve else None,
            "history": self.history,
            "feature_cache": self.feature_cache,
            **({"wise": self.mix.to_dict()} if self.mix is not None else {}),
            **({"retention": self.retention.to_dict()} if self.retention is not None else {}),
            **({"note": self.note} if self.note else {}),
        }
