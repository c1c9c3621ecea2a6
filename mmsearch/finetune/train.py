"""Contrastive fine-tuning of an open_clip model on (file, caption) pairs.

`finetune` is one loop, read top to bottom: load the base model, decode and split the pairs, adapt
the model for the method, evaluate, then per epoch train (AdamW, warmup + cosine, gradient
accumulation, mixed precision on GPU), evaluate on the held-out files, keep the best epoch as a
merged open_clip model directory and checkpoint. A checkpoint holds the trainable weights, the
optimizer, the RNG and the config, written to a fresh folder and then pointed to by an atomically
replaced `latest.json`, so an interrupt at any moment leaves the previous one intact.

Files written to `config.out`:
    open_clip_config.json, open_clip_model.safetensors  the best epoch, adapters merged
    training_log.json                                   config, data counts, per-epoch history
    curve.png                                           loss and recall curves (the `plot` extra)
    checkpoint/                                         while training (kept with keep_checkpoint)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULT_MODEL, ModelSpec
from ..errors import LoadError, UsageError
from ..records import IMAGE
from .evaluate import Progress, Recall, _quiet, decode_images, recall_at_k
from .methods import DEFAULT_LORA_TARGETS, DEFAULT_LR, METHODS
from .pairs import UNDECODABLE, PairSet, Skipped, split_by_file

FORMAT_VERSION = 1
LOG_NAME = "training_log.json"
CURVE_NAME = "curve.png"
PLOT_HINT = "install mmsearch[plot] for the curve PNG"  # the result's note without matplotlib
CHECKPOINT_DIR = "checkpoint"
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the temperature the same way
# Fields that may differ between a run and its --resume (they do not change what is computed).
RESUME_FREE = frozenset(
    {"resume", "overwrite", "device", "precision", "workers", "image_cache_mb", "plot",
     "keep_checkpoint", "checkpoint_every", "out", "feature_cache"}
)  # fmt: skip


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs besides the pairs. Built once at the CLI edge."""

    model: str = DEFAULT_MODEL  # open_clip name[:tag], hf-hub:org/repo or a model directory
    out: Path = Path("models/finetuned")
    method: str = "head"  # head | lora | lock-image | full
    epochs: int = 5
    batch_size: int = 64  # per forward pass; the contrastive batch is batch_size * grad_accum
    lr: float | None = None  # None: methods.DEFAULT_LR[method]
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
            (self.unlocked_text_layers is None or self.method == "lock-image",
             "--unlocked-text-layers goes with --method lock-image"),
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
            **({"note": self.note} if self.note else {}),
        }


def finetune(
    pairs: PairSet,
    config: FinetuneConfig,
    progress: Progress | None = None,
    val_pairs: PairSet | None = None,
) -> FinetuneResult:
    """Fine-tune `config.model` on the image pairs of `pairs`; evaluate on `val_pairs` or on
    held-out files of `pairs`. Audio pairs are left to `finetune.audio.train_audio_projector`.

    `progress(event, **info)` is called with events: "load_model", "data", "decode", "features",
    "resume", "eval", "step", "epoch", "checkpoint", "warning", "done".
    """
    import torch

    from ..encoders.clip import _prep_from, create_open_clip, pick_device
    from .methods import apply_method, set_train_mode

    progress = progress or _quiet
    spec = ModelSpec.parse(config.model)
    out = config.out
    ckpt_root = out / CHECKPOINT_DIR
    resume_state, note = _check_out_dir(spec, config, ckpt_root)
    if note:
        progress("warning", message=note)
    device = pick_device(config.device)
    amp_dtype = _amp_dtype(device, config.precision)

    # --- base model: seeded, so random-init towers and adapter inits repeat --------------------
    progress("load_model", model=str(spec), device=device)
    torch.manual_seed(config.seed)
    model, tokenizer, _ = create_open_clip(spec, device="cpu")  # ModelError if it cannot load
    model_cfg = _output_model_cfg(spec, model)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    prep = _prep_from(preprocess_cfg)

    # --- data: decode once, split by file ------------------------------------------------------
    train, val, skipped = _prepare_data(pairs, val_pairs, prep, tokenizer, config, progress)
    fingerprint = _fingerprint(train, val)
    progress(
        "data", train_pairs=len(train.file_of), train_files=len(train.files),
        val_pairs=len(val.file_of), val_files=len(val.files), skipped=_counts(skipped),
    )  # fmt: skip

    # --- method: freeze, add adapters; `plain` is the merged copy that gets saved ------------
    plain = _frozen_copy(model)  # no adapters yet: safe to deep-copy
    adapted = apply_method(
        model, config.method, config.lora_rank, config.lora_alpha, config.lora_targets,
        config.unlocked_text_layers,
    )  # fmt: skip
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _param_groups(params, config.weight_decay), lr=config.learning_rate,
        betas=(0.9, 0.98), eps=1e-6, fused=device in ("cpu", "cuda"),  # fused: ~7x faster on CPU
    )  # fmt: skip
    # fp16 needs loss scaling against gradient underflow; bf16 has fp32's exponent range
    scaler = torch.amp.GradScaler(device) if amp_dtype == torch.float16 else None
    autocast = (
        (lambda: torch.autocast(device, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    )
    encode = _Encoder(model, device, prep, autocast, config, amp_dtype)
    # Frozen tower parts run once per file / caption instead of every step.
    encode.cache_frozen_prefixes(train, val, progress)

    samples_per_epoch = len(train.files) if config.one_caption_per_file else len(train.file_of)
    steps_per_epoch = math.ceil(samples_per_epoch / (config.batch_size * config.grad_accum))
    total_steps = steps_per_epoch * config.epochs
    warmup = (
        config.warmup_steps
        if config.warmup_steps is not None
        else int(config.warmup_fraction * total_steps)
    )

    # --- state: fresh (evaluate the base model) or resumed from the last checkpoint -----------
    if resume_state is not None:
        st = _load_checkpoint(resume_state, model, optimizer, scaler, config, fingerprint, device)
        plain.load_state_dict(_load_weights(out / "open_clip_model.safetensors"))
        progress("resume", epoch=st["epoch"], step=st["global_step"])
    else:
        st = {
            "epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "loss_count": 0,
            "history": [], "step_losses": [], "best_epoch": 0, "best": None, "before": None,
            "train_time": 0.0, "train_samples": 0,
        }  # fmt: skip
        before = encode.recall(val)
        st["before"] = st["best"] = before.to_dict()
        st["history"].append({"epoch": 0, "train_loss": None, "recall": before.to_dict()})
        progress("eval", epoch=0, recall=before)
        _install_best(plain, model, model_cfg, preprocess_cfg, out)
        if hasattr(tokenizer, "save_pretrained"):
            # open_clip loads a local-dir model's Hugging Face tokenizer from the directory itself
            tokenizer.save_pretrained(str(out))
        _write_log(out, config, spec, adapted, train, val, skipped, st, finished=False)

    # --- the loop -------------------------------------------------------------------------------
    logit_scale = getattr(model, "logit_scale", None)
    groups_all = torch.from_numpy(train.file_of).to(device)
    captions_of = _captions_by_file(train)
    since_ckpt = 0
    for epoch in range(st["epoch"] + 1, config.epochs + 1):
        rng = np.random.default_rng([config.seed, epoch])
        if config.one_caption_per_file:
            order = rng.permutation([c[rng.integers(len(c))] for c in captions_of])
        else:
            order = rng.permutation(len(train.file_of))
        step_size = config.batch_size * config.grad_accum
        set_train_mode(model)
        t_epoch = time.perf_counter()
        for step_in_epoch in range(st["step_in_epoch"], steps_per_epoch):
            t0 = time.perf_counter()
            idx = order[step_in_epoch * step_size : (step_in_epoch + 1) * step_size]
            lr = _lr_at(st["global_step"], total_steps, warmup, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [idx[i : i + config.batch_size] for i in range(0, len(idx), config.batch_size)]
            loss = _accumulate(encode, micro, train, groups_all, logit_scale, scaler, autocast)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if logit_scale is not None:
                with torch.no_grad():
                    logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if device == "cuda":
                torch.cuda.synchronize()
            st["train_time"] += time.perf_counter() - t0
            st["train_samples"] += len(idx)
            st["global_step"] += 1
            st["step_in_epoch"] = step_in_epoch + 1
            st["loss_sum"] += loss * len(idx)
            st["loss_count"] += len(idx)
            st["step_losses"].append(round(loss, 6))
            progress(
                "step", epoch=epoch, step=st["global_step"], steps=total_steps, loss=loss, lr=lr
            )
            since_ckpt += 1
            if (
                config.checkpoint_every
                and since_ckpt >= config.checkpoint_every
                and st["step_in_epoch"] < steps_per_epoch
            ):
                path = _save_checkpoint(
                    ckpt_root, model, optimizer, scaler, config, fingerprint, st
                )
                since_ckpt = 0
                progress("checkpoint", path=path, step=st["global_step"])

        # epoch end: evaluate, keep the best, checkpoint
        epoch_seconds = time.perf_counter() - t_epoch
        recall = encode.recall(val)
        train_loss = st["loss_sum"] / max(1, st["loss_count"])
        st["history"].append({
            "epoch": epoch, "train_loss": round(train_loss, 6), "lr": lr, "recall": recall.to_dict(),
            "seconds": round(epoch_seconds, 3),
        })  # fmt: skip
        if recall.mean > Recall.from_dict(st["best"]).mean:
            st["best"], st["best_epoch"] = recall.to_dict(), epoch
            _install_best(plain, model, model_cfg, preprocess_cfg, out)
        st.update(epoch=epoch, step_in_epoch=0, loss_sum=0.0, loss_count=0)
        path = _save_checkpoint(ckpt_root, model, optimizer, scaler, config, fingerprint, st)
        since_ckpt = 0
        _write_log(out, config, spec, adapted, train, val, skipped, st, finished=False)
        progress("checkpoint", path=path, step=st["global_step"])
        progress(
            "epoch", epoch=epoch, epochs=config.epochs, loss=train_loss, recall=recall,
            best_epoch=st["best_epoch"], samples_per_s=st["train_samples"] / max(st["train_time"], 1e-9),
        )  # fmt: skip

    # --- finish: curve, log, drop the checkpoint ------------------------------------------------
    curve = _plot_curve(st, out / CURVE_NAME) if config.plot else None
    if config.plot and curve is None:
        note = f"{note}; {PLOT_HINT}" if note else PLOT_HINT
    _write_log(out, config, spec, adapted, train, val, skipped, st, finished=True)
    if not config.keep_checkpoint:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    progress("done", out=out)
    return FinetuneResult(
        out=out,
        method=config.method,
        before=Recall.from_dict(st["before"]),
        after=Recall.from_dict(st["best"]),
        best_epoch=st["best_epoch"],
        epochs=config.epochs,
        history=st["history"],
        skipped=_counts(skipped),
        train_pairs=len(train.file_of),
        train_files=len(train.files),
        val_pairs=len(val.file_of),
        val_files=len(val.files),
        samples_per_s=st["train_samples"] / max(st["train_time"], 1e-9),
        train_seconds=st["train_time"],
        curve=curve,
        model=plain,
        note=note,
    )


# --- one optimizer step ---------------------------------------------------------------------------


def _accumulate(encode, micro, split, groups_all, logit_scale, scaler, autocast) -> float:
    """Backward of the contrastive loss over all micro-batches of one step, as if they were one
    batch: features of the other micro-batches come from a no-grad pass (open_clip's accum_freq),
    so the gradients add up to the full-batch gradient."""
    import torch

    from ..losses import clip_loss

    def scale(k: int):
        if logit_scale is None:
            return 1 / 0.07
        s = logit_scale.exp()
        return s if k == 0 else s.detach()  # the temperature's gradient is counted once

    groups = groups_all[torch.from_numpy(np.concatenate(micro)).to(groups_all.device)]
    if len(micro) == 1:
        with autocast():
            img, txt = encode.features(split, micro[0])
            loss = clip_loss(img, txt, scale(0), groups)
        _backward(loss, scaler)
        return float(loss.detach())
    with torch.no_grad(), autocast():
        cached = [encode.features(split, m) for m in micro]
    for k, m in enumerate(micro):
        with autocast():
            img, txt = encode.features(split, m)
            imgs = torch.cat([c[0] for c in cached[:k]] + [img] + [c[0] for c in cached[k + 1 :]])
            txts = torch.cat([c[1] for c in cached[:k]] + [txt] + [c[1] for c in cached[k + 1 :]])
            loss = clip_loss(imgs, txts, scale(k), groups)
        _backward(loss, scaler)
    return float(loss.detach())


def _backward(loss, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _lr_at(step: int, total: int, warmup: int, config: FinetuneConfig) -> float:
    base = config.learning_rate
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (
        config.min_lr_fraction + (1 - config.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def _param_groups(params, weight_decay: float) -> list[dict]:
    # As open_clip_train: no decay on gains, biases and the temperature.
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    decay = [p for n, p in params if not exclude(n, p)]
    rest = [p for n, p in params if exclude(n, p)]
    return [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _amp_dtype(device: str, precision: str):
    """The autocast dtype, None for plain fp32. auto: bf16 on CUDA where supported (else fp16)
    and on CPUs with native bf16 (AVX512-BF16/AMX); fp32 elsewhere, where emulated bf16 is slower
    than fp32. Explicit bf16/fp16 run on any device torch autocasts on (cuda, cpu, mps)."""
    import torch

    from ..encoders.clip import cpu_has_native_bf16

    if precision == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device == "cpu" and cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# --- data -----------------------------------------------------------------------------------------


@dataclass
class _Split:
    """One side of the split: distinct files, and per caption its file index and tokens."""

    files: list[Path]
    file_of: np.ndarray  # (n_captions,) int64
    captions: list[str]
    tokens: Any  # torch.LongTensor (n_captions, context)
    pixels: np.ndarray | None = None  # (n_files, H, W, 3) uint8 when cached
    image_prefix: Any = None  # frozen image-prefix features per file (torch, on device)
    text_prefix: Any = None  # frozen text-trunk features per caption (torch, on device)
    by_length: np.ndarray | None = None  # caption indices, shortest first


def _prepare_data(pairs, val_pairs, prep, tokenizer, config, progress):
    skipped = list(pairs.skipped) + (list(val_pairs.skipped) if val_pairs is not None else [])
    # Audio pairs are not skipped: `finetune.audio.train_audio_projector` trains them (the CLI
    # runs it after this), so they are neither used nor counted here.
    image_pairs = pairs.of(IMAGE).pairs
    val_image_pairs = val_pairs.of(IMAGE).pairs if val_pairs is not None else []
    files = list(dict.fromkeys([p.path for p in image_pairs] + [p.path for p in val_image_pairs]))
    if not files:
        raise UsageError("no usable image pairs to train on" + _skip_note(skipped))

    # Decode every file once: bad ones are found before training, and the pixels are kept in
    # memory while they fit the budget (else they are decoded again per batch).
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
    for p in image_pairs + val_image_pairs:
        if p.path in bad:
            skipped.append(Skipped(str(p.path), f"{UNDECODABLE}: {bad[p.path]}"))
    image_pairs = [p for p in image_pairs if p.path not in bad]
    val_image_pairs = [p for p in val_image_pairs if p.path not in bad]

    if val_pairs is None:
        train_side, val_side = split_by_file(PairSet(image_pairs), config.val_fraction, config.seed)
        image_pairs, val_image_pairs = train_side.pairs, val_side.pairs
        if len(val_side.files()) < 2 or len(train_side.files()) < 2:
            raise UsageError(
                f"{len(train_side.files()) + len(val_side.files())} usable files are too few to hold "
                "out a validation split (need --val-fraction > 0 and at least 4 files, or separate "
                "validation pairs)" + _skip_note(skipped)
            )
    else:
        overlap = {p.path for p in image_pairs} & {p.path for p in val_image_pairs}
        if overlap:
            raise UsageError(
                f"{len(overlap)} files appear in both the training and the validation pairs"
            )
    if len({p.path for p in image_pairs}) < 2 or not val_image_pairs:
        raise UsageError("too few usable pairs to train and evaluate" + _skip_note(skipped))

    keep_pixels = used <= budget
    splits = []
    for side in (image_pairs, val_image_pairs):
        side_files = list(dict.fromkeys(p.path for p in side))
        index = {f: i for i, f in enumerate(side_files)}
        captions = [p.caption for p in side]
        split = _Split(
            files=side_files,
            file_of=np.array([index[p.path] for p in side], dtype=np.int64),
            captions=captions,
            tokens=tokenizer(captions),
            pixels=np.stack([decoded[f] for f in side_files]) if keep_pixels else None,
        )
        splits.append(split)
    if not keep_pixels:
        progress(
            "warning",
            message=f"decoded images exceed {config.image_cache_mb} MB; decoding per batch",
        )
    return splits[0], splits[1], skipped


def _fingerprint(train: _Split, val: _Split) -> str:
    h = hashlib.sha256()
    for split in (train, val):
        for f in split.files:
            h.update(os.fsencode(f) + b"\0")
        h.update(split.file_of.tobytes())
        for c in split.captions:
            h.update(c.encode() + b"\0")
        h.update(b"|")
    return h.hexdigest()[:16]


def _counts(skipped: list[Skipped]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skipped:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


def _skip_note(skipped) -> str:
    c = _counts(skipped)
    return f" (skipped: {', '.join(f'{v} {k}' for k, v in c.items())})" if c else ""


# --- forward passes ---------------------------------------------------------------------------------


class _Encoder:
    """Image and text features of the model being trained, from cached pixels, cached frozen
    prefixes, or full forward passes."""

    def __init__(self, model, device, prep, autocast, config, amp_dtype=None):
        import torch

        self.model, self.device, self.prep = model, device, prep
        self.autocast, self.config, self.amp = autocast, config, str(amp_dtype)
        self.mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1) * 255
        self.image_suffix = self.text_suffix = None
        self.image_cached = self.text_cached = False
        self.text_parts = text_parts(model)
        self.pad_id = self.text_parts[3] if self.text_parts else 0

    def pixels(self, split: _Split, file_idx: np.ndarray):
        import torch

        if split.pixels is not None:
            batch = split.pixels[file_idx]
        else:
            paths = [split.files[i] for i in file_idx]
            batch = np.stack(decode_images(paths, self.prep, self.config.workers))
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def image(self, split: _Split, file_idx: np.ndarray):
        if self.image_cached:
            import torch

            x = split.image_prefix[torch.from_numpy(file_idx).to(self.device)]
            return self.image_suffix(x) if self.image_suffix is not None else x
        return self.model.encode_image(self.pixels(split, file_idx))

    def text(self, split: _Split, caption_idx: np.ndarray):
        import torch

        idx = torch.from_numpy(caption_idx).to(self.device)
        if self.text_cached:
            return self.text_suffix(split.text_prefix[idx])
        return encode_text(self.model, split.tokens[idx])

    def features(self, split: _Split, caption_idx: np.ndarray):
        return self.image(split, split.file_of[caption_idx]), self.text(split, caption_idx)

    def cache_frozen_prefixes(self, train: _Split, val: _Split, progress) -> None:
        import torch

        from .methods import frozen_image_stage

        for split in (train, val):
            split.tokens = split.tokens.to(self.device)
            # shortest first, so each batch is cut to similar lengths (no-grad passes only)
            split.by_length = np.argsort(
                (split.tokens != self.pad_id).sum(1).cpu().numpy(), kind="stable"
            )
        bs = max(self.config.batch_size, 64)
        stage = frozen_image_stage(self.model)
        if stage is not None:
            prefix, self.image_suffix = stage
            prefix.eval()
            # channels-last runs CPU convolution trunks ~1.4x faster; the layout is restored after
            fmt = torch.channels_last if self.device == "cpu" else torch.contiguous_format
            for split in (train, val):

                def compute(split=split):
                    parts = []
                    prefix.to(memory_format=fmt)
                    for s in range(0, len(split.files), bs):
                        x = self.pixels(split, np.arange(s, min(s + bs, len(split.files))))
                        with torch.no_grad(), self.autocast():
                            parts.append(prefix(x.contiguous(memory_format=fmt)).float())
                        progress("features", tower="image", done=min(s + bs, len(split.files)),
                                 total=len(split.files))  # fmt: skip
                    prefix.to(memory_format=torch.contiguous_format)
                    return torch.cat(parts)

                key = [
                    ("files", [(str(f), _stat(f)) for f in split.files]),
                    ("prep", self.prep.to_dict()),
                ]
                split.image_prefix = self._persisted("image", prefix, key, compute)
                split.pixels = None  # the prefix features replace the pixels
            self.image_cached = True
        trunk_frozen = self.text_parts is not None and not any(
            p.requires_grad for m in self.text_parts[2] for p in m.parameters()
        )
        if trunk_frozen:
            pooled, self.text_suffix, trunk, _ = self.text_parts
            for m in trunk:
                if isinstance(m, torch.nn.Module):
                    m.eval()  # no dropout in features computed once
            for split in (train, val):

                def compute(split=split):
                    out = torch.empty(0)
                    for s in range(0, len(split.by_length), bs):
                        idx = torch.from_numpy(split.by_length[s : s + bs]).to(self.device)
                        with torch.no_grad(), self.autocast():
                            x = pooled(split.tokens[idx]).float()
                        if s == 0:
                            out = torch.empty(len(split.by_length), x.shape[1], device=self.device)
                        out[idx] = x
                        progress("features", tower="text", done=min(s + bs, len(split.by_length)),
                                 total=len(split.by_length))  # fmt: skip
                    return out

                split.text_prefix = self._persisted("text", trunk, self._text_key(split), compute)
            self.text_cached = True

    def _text_key(self, split: _Split) -> list:
        return [("tokens", hashlib.sha256(split.tokens.cpu().numpy().tobytes()).hexdigest())]

    def _cache_path(self, kind: str, modules, key: list) -> Path:
        """Named by everything the features depend on: weights, inputs, precision."""
        h = hashlib.sha256(json.dumps([FORMAT_VERSION, kind, self.amp, key]).encode())
        for m in modules if isinstance(modules, (list, tuple)) else [modules]:
            for name, t in m.state_dict().items():
                h.update(name.encode())
                h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
        return Path(self.config.feature_cache) / f"{kind}-{h.hexdigest()[:32]}.safetensors"

    def _persisted(self, kind: str, modules, key: list, compute):
        """compute(), or its result from `config.feature_cache` when the same frozen weights
        already ran on the same inputs."""
        from safetensors.torch import load_file, save_file

        if self.config.feature_cache is None:
            return compute()
        path = self._cache_path(kind, modules, key)
        if path.is_file():
            return load_file(str(path))["features"].to(self.device)
        feats = compute().float()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{secrets.token_hex(3)}.tmp")
        save_file({"features": feats.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
        return feats

    def _known_text_prefix(self, split: _Split):
        """Text-trunk features of `split` from the feature cache when the (trainable) trunk is
        still bit-identical to one that ran on these captions, as before the first step of a
        run that starts from a model whose frozen text trunk was cached."""
        from safetensors.torch import load_file

        if self.text_cached or self.text_parts is None or self.config.feature_cache is None:
            return None
        path = self._cache_path("text", self.text_parts[2], self._text_key(split))
        return load_file(str(path))["features"].to(self.device) if path.is_file() else None

    def text_suffix_of(self, x):
        return self.text_parts[1](x)

    def recall(self, split: _Split) -> Recall:
        import torch
        import torch.nn.functional as F

        self.model.eval()
        bs = max(self.config.batch_size, 64)
        img = []
        txt = torch.empty(0)
        known = self._known_text_prefix(split)
        with torch.no_grad(), self.autocast():
            for s in range(0, len(split.files), bs):
                x = self.image(split, np.arange(s, min(s + bs, len(split.files))))
                img.append(F.normalize(x.float(), dim=-1))
            for s in range(0, len(split.by_length), bs):
                idx = split.by_length[s : s + bs]
                if known is not None:  # the suffix on features an earlier run cached
                    x = self.text_suffix_of(known[torch.from_numpy(idx).to(self.device)])
                else:
                    x = self.text(split, idx)
                x = F.normalize(x.float(), dim=-1)
                if s == 0:
                    txt = torch.empty(len(split.by_length), x.shape[1], device=x.device)
                txt[torch.from_numpy(idx).to(x.device)] = x
        image_emb = torch.cat(img).cpu().numpy()
        return recall_at_k(image_emb, txt.cpu().numpy(), split.file_of)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _captions_by_file(split: _Split) -> list[np.ndarray]:
    order = np.argsort(split.file_of, kind="stable")
    bounds = np.searchsorted(split.file_of[order], np.arange(len(split.files) + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(len(split.files))]


def text_parts(model):
    """(pooled, project, trunk modules, pad id) for text towers whose forward splits at the output
    projection (open_clip's CLIP text tower, Hugging Face towers); None for others.

    `pooled(tokens)` cuts the batch to its longest text where padding provably cannot change the
    result: a causal mask with argmax pooling, or a padding-masked Hugging Face tower.
    """
    import torch

    text = getattr(model, "text", None)
    if text is not None and all(
        hasattr(text, a) for a in ("transformer", "pooler", "proj", "config")
    ):
        pad = text.config.pad_token_id
        if pad is None:
            return None

        def hf_pooled(tokens):  # HFTextEncoder.forward up to its projection
            tokens = tokens[:, : _used_columns(tokens, pad)]
            mask = (tokens != pad).long()
            return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)

        return hf_pooled, text.proj, [text.transformer], pad
    trimmable = (
        text is None
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and hasattr(model, "positional_embedding")
    )
    if not trimmable:
        return None

    def clip_pooled(tokens):  # CLIP.encode_text up to its projection
        n = _used_columns(tokens, 0)
        tokens = tokens[:, :n]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
        x = model.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]

    def clip_project(x):
        proj = model.text_projection
        if isinstance(proj, torch.nn.Linear):
            return proj(x)
        return x @ proj if proj is not None else x

    trunk = [model.token_embedding, model.transformer, model.ln_final]
    return clip_pooled, clip_project, [*trunk, _ParamHolder(model.positional_embedding)], 0


class _ParamHolder:
    """Lets a bare parameter sit in a list of modules for freezing checks and hashing."""

    def __init__(self, p):
        self.p = p

    def parameters(self):
        return iter([self.p])

    def state_dict(self):
        return {"p": self.p}


def encode_text(model, tokens):
    """`model.encode_text`, through `text_parts` where the tower allows (same result, faster)."""
    parts = text_parts(model)
    if parts is None:
        return model.encode_text(tokens)
    pooled, project, _, _ = parts
    return project(pooled(tokens))


def _used_columns(tokens, pad_id: int) -> int:
    used = (tokens != pad_id).any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


# --- model files ------------------------------------------------------------------------------------


def _output_model_cfg(spec: ModelSpec, model) -> dict:
    """The base model's open_clip config, made explicit so the saved directory rebuilds the same
    architecture (open_clip issue 771: a reload that silently changed the activation)."""
    import copy

    from open_clip.transformer import QuickGELU

    from ..encoders.clip import _model_cfg

    cfg = copy.deepcopy(_model_cfg(spec))
    if not cfg:
        raise UsageError(f"no open_clip config found for {spec}")
    if any(isinstance(m, QuickGELU) for m in model.modules()):
        cfg["quick_gelu"] = True
    return cfg


def _frozen_copy(model):
    import copy

    plain = copy.deepcopy(model).cpu().eval()
    plain.requires_grad_(False)
    return plain


def _install_best(plain, model, model_cfg, preprocess_cfg, out: Path) -> None:
    """Fold the adapters into `plain` and write it to `out` (each file replaced atomically)."""
    from ..encoders.clip import save_model_dir
    from .methods import merged_state_dict

    plain.load_state_dict({k: v.cpu() for k, v in merged_state_dict(model).items()})
    tmp = out / f".model-{secrets.token_hex(4)}.partial"
    save_model_dir(plain, model_cfg, tmp, preprocess_cfg)
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        _fsync(tmp / name)
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def _load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- checkpoints --------------------------------------------------------------------------------------


def _check_out_dir(
    spec: ModelSpec, config: FinetuneConfig, ckpt_root: Path
) -> tuple[Path | None, str | None]:
    """Refuse to clobber; (the checkpoint folder to continue from on --resume, a note to report).

    A run killed before its first checkpoint leaves only its starting model and an unfinished
    log: nothing to continue and nothing trained to lose, so both `--resume` and a plain rerun
    start it over (and say so) instead of sending the user from one to the other.
    """
    out = config.out
    if spec.is_local and spec.local_path.resolve() == out.resolve():
        raise UsageError("--out must differ from the model directory being fine-tuned")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    latest = _latest_checkpoint(ckpt_root)
    log = _read_log(out)
    has_model = (out / "open_clip_config.json").exists()
    unfinished = log is not None and not log.get("finished")
    note = None
    if config.resume:
        if latest is not None:
            return latest, None
        if log is not None and log.get("finished"):
            raise UsageError(
                f"training in {out} already finished; nothing to resume (--overwrite trains again)"
            )
        if has_model and not unfinished:
            raise UsageError(
                f"{out} holds a model that is not an interrupted fine-tune; nothing to resume "
                "(--overwrite replaces it, or pass another --out)"
            )
        note = f"no checkpoint to resume in {out}: started from the beginning"
    elif latest is not None and not config.overwrite:
        step = _checkpoint_step(latest)
        raise UsageError(
            f"{out} holds an interrupted fine-tune (checkpoint at step {step}); use --resume to "
            "continue it, --overwrite to start over, or another --out"
        )
    elif has_model and not config.overwrite:
        if not unfinished:
            what = "fine-tuned model" if log is not None else "model"
            raise UsageError(
                f"{out} already holds a {what}; use --overwrite to replace it, or another --out"
            )
        note = f"{out} held a run stopped before its first checkpoint: started it over"
    if ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    out.mkdir(parents=True, exist_ok=True)
    return None, note


def _read_log(out: Path) -> dict | None:
    try:
        log = json.loads((out / LOG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return log if isinstance(log, dict) else None


def _checkpoint_step(folder: Path) -> int | str:
    try:
        return json.loads((folder / "state.json").read_text())["state"]["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest.json"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (ValueError, KeyError):
        return None
    folder = ckpt_root / name
    return folder if (folder / "state.json").is_file() else None


def _save_checkpoint(ckpt_root, model, optimizer, scaler, config, fingerprint, st) -> Path:
    import torch
    from safetensors.torch import save_file

    from .methods import trainable_state

    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{st['global_step']:08d}-{secrets.token_hex(3)}"
    tmp = ckpt_root / (name + ".partial")
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable_state(model).items()},
              str(tmp / "trainable.safetensors"))  # fmt: skip
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"state.{pid}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "fingerprint": fingerprint,
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": st,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        _fsync(f)
    os.rename(tmp, ckpt_root / name)
    _write_json_atomic(ckpt_root / "latest.json", {"format_version": FORMAT_VERSION, "dir": name})
    for old in ckpt_root.iterdir():  # only now is the previous checkpoint no longer needed
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt_root / name


def _load_checkpoint(folder: Path, model, optimizer, scaler, config, fingerprint, device) -> dict:
    import torch

    saved = json.loads((folder / "state.json").read_text())
    if saved.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"checkpoint {folder} has format {saved.get('format_version')}, expected {FORMAT_VERSION}"
        )
    now = config.to_dict()
    changed = [k for k, v in saved["config"].items() if k not in RESUME_FREE and now.get(k) != v]
    if changed:
        raise UsageError(
            "cannot resume with different settings: "
            + ", ".join(f"{k} (was {saved['config'][k]!r}, now {now.get(k)!r})" for k in changed)
        )
    if saved["fingerprint"] != fingerprint:
        raise UsageError("cannot resume: the pairs differ from those the checkpoint was trained on")
    weights = _load_weights(folder / "trainable.safetensors")
    missing = [k for k in weights if k not in model.state_dict()]
    if missing:
        raise UsageError(
            f"checkpoint {folder} does not match the model ({len(missing)} unknown weights)"
        )
    model.load_state_dict(weights, strict=False)
    tensors = _load_weights(folder / "optimizer.safetensors")
    opt_state: dict = {}
    for key, value in list(tensors.items()) + list(saved["optimizer_scalars"].items()):
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": saved["param_groups"]})
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return saved["state"]


def _write_log(out, config, spec, adapted, train, val, skipped, st, finished: bool) -> None:
    log = {
        "format_version": FORMAT_VERSION,
        "finished": finished,
        "base_model": str(spec),
        "config": config.to_dict(),
        "adapted": adapted,
        "data": {
            "train_pairs": len(train.file_of),
            "train_files": len(train.files),
            "val_pairs": len(val.file_of),
            "val_files": len(val.files),
            "skipped": _counts(skipped),
            "skipped_examples": [{"where": s.where, "reason": s.reason} for s in skipped[:50]],
        },  # fmt: skip
        "before": st["before"],
        "best_epoch": st["best_epoch"],
        "best": st["best"],
        "samples_per_s": st["train_samples"] / max(st["train_time"], 1e-9),
        "history": st["history"],
        "step_losses": st["step_losses"],
    }
    _write_json_atomic(out / LOG_NAME, log)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".{secrets.token_hex(3)}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _plot_curve(st: dict, path: Path) -> Path | None:
    """Loss and recall curves as a PNG; None when matplotlib (the `plot` extra) is missing.

    Matplotlib's object API (a Figure on its own Agg canvas, no pyplot): the caller's backend
    and pyplot's global figures are left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    hist = st["history"]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_rec = fig.subplots(1, 2)
    losses = st["step_losses"]
    if losses:
        ax_loss.plot(np.arange(1, len(losses) + 1), losses, lw=0.7, alpha=0.5, label="step")
        per_epoch = max(1, len(losses) // max(1, len(hist) - 1))
        ends = [h for h in hist if h["train_loss"] is not None]
        ax_loss.plot(
            [h["epoch"] * per_epoch for h in ends],
            [h["train_loss"] for h in ends],
            "o-",
            label="epoch mean",
        )
    ax_loss.set(xlabel="optimizer step", ylabel="InfoNCE loss", title="training loss")
    ax_loss.legend()
    epochs = [h["epoch"] for h in hist]
    for direction, style in (("text_to_image", "-"), ("image_to_text", "--")):
        for k in (1, 5, 10):
            ax_rec.plot(epochs, [h["recall"][direction][f"R@{k}"] for h in hist], style, marker="o",
                        label=f"{direction.replace('_to_', '→').replace('text', 't').replace('image', 'i')} R@{k}")  # fmt: skip
    ax_rec.axvline(st["best_epoch"], color="grey", lw=0.8, ls=":")
    ax_rec.set(
        xlabel="epoch (0 = before)", ylabel="held-out recall", title="held-out recall", ylim=(0, 1)
    )
    ax_rec.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
