"""The optimizer side of fine-tuning: AdamW with its parameter groups, the learning-rate schedule
(linear warmup, then cosine), the mixed-precision setting, and the contrastive loss's backward
over the micro-batches of one step."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from .config import FinetuneConfig
from .data import Split


def make_optimizer(params, config, device, amp_dtype):
    """(AdamW, a loss scaler for fp16 or None, the autocast context factory)."""
    import torch

    from ..encoders.clip import device_type

    kind = device_type(device)  # autocast and GradScaler take "cuda", not "cuda:1"
    optimizer = torch.optim.AdamW(
        _param_groups(params, config.weight_decay), lr=config.learning_rate,
        betas=(0.9, 0.98), eps=1e-6, fused=kind in ("cpu", "cuda"),  # fused: ~7x faster on CPU
    )  # fmt: skip
    # fp16 needs loss scaling against gradient underflow; bf16 has fp32's exponent range
    scaler = torch.amp.GradScaler(kind) if amp_dtype == torch.float16 else None
    autocast = (
        (lambda: torch.autocast(kind, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    )
    return optimizer, scaler, autocast


def schedule(config: FinetuneConfig, train: Split, replayed: int = 0) -> tuple[int, int, int]:
    """(optimizer steps per epoch, in all, of warmup); `replayed` of each step's pairs are
    retention pairs, the rest the user's (`replay`)."""
    samples_per_epoch = len(train.files) if config.one_caption_per_file else len(train.file_of)
    per_step = config.batch_size * config.grad_accum - replayed
    steps_per_epoch = math.ceil(samples_per_epoch / per_step)
    total_steps = steps_per_epoch * config.epochs
    warmup = (
        config.warmup_steps
        if config.warmup_steps is not None
        else int(config.warmup_fraction * total_steps)
    )
    return steps_per_epoch, total_steps, warmup


def accumulate(encode, micro, split, groups_all, logit_scale, scaler, autocast) -> float:
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


def lr_at(step: int, total: int, warmup: int, config: FinetuneConfig) -> float:
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


def autocast_dtype(device: str, precision: str):
    """The autocast dtype, None for plain fp32. auto: bf16 on CUDA where supported (else fp16)
    and on CPUs with native bf16 (AVX512-BF16/AMX); fp32 elsewhere, where emulated bf16 is slower
    than fp32. Explicit bf16/fp16 run on any device torch autocasts on (cuda, cpu, mps)."""
    import torch

    from ..encoders.clip import cpu_has_native_bf16, device_type

    if precision == "auto":
        if device_type(device) == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device == "cpu" and cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
