"""Contrastive fine-tuning of an open_clip model on (file, caption) pairs.

`finetune` reads top to bottom: check the output folder, load the base model, decode and split the
pairs (`data`), adapt the model for the method (`methods`), evaluate it, then per epoch train
(AdamW, warmup + cosine, gradient accumulation, mixed precision on GPU), evaluate on the held-out
files, keep the best epoch as a merged open_clip model directory, and checkpoint (`checkpoint`
says what is written, and how an interrupt leaves it).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelSpec
from .checkpoint import (
    CHECKPOINT_DIR,
    CURVE_NAME,
    TrainState,
    check_out_dir,
    install_best,
    load_best,
    load_checkpoint,
    load_weights,
    output_model_cfg,
    plot_curve,
    save_checkpoint,
    write_log,
)
from .config import FinetuneConfig, FinetuneResult
from .data import Split, captions_by_file, counts, fingerprint, prepare_data
from .encode import TrainEncoder, frozen_copy
from .evaluate import Progress, Recall, _quiet
from .optim import accumulate, autocast_dtype, lr_at, make_optimizer, schedule
from .pairs import PairSet

PLOT_HINT = "install mmsearch[plot] for the curve PNG"  # the result's note without matplotlib
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the temperature the same way


def finetune(
    pairs: PairSet,
    config: FinetuneConfig,
    progress: Progress | None = None,
    val_pairs: PairSet | None = None,
    retain_pairs: PairSet | None = None,
    retain_index: tuple[Path, str] | None = None,
) -> FinetuneResult:
    """Fine-tune `config.model` on the image pairs of `pairs`; evaluate on `val_pairs` or on
    held-out files of `pairs`. Audio pairs are left to `finetune.audio.train_audio_projector`.
    With `retain_pairs` (general pairs whose retrieval must not degrade), the saved model is the
    WiSE-FT mix of base and fine-tuned weights chosen under `config.max_forgetting` (`wise`).
    Without them, `retain_index` ((index root, name)) gives retention pairs from the photos of
    that index where it exists (`retention.index_retention`).

    `progress(event, **info)` is called with events: "load_model", "data", "decode", "features",
    "resume", "eval", "step", "epoch", "checkpoint", "mix", "feature_cache", "warning", "done".
    """
    progress = progress or _quiet
    spec = ModelSpec.parse(config.model)
    resume_from, note = check_out_dir(spec, config, config.out / CHECKPOINT_DIR)
    if note:
        progress("warning", message=note)
    run = _setup(spec, config, pairs, val_pairs, (retain_pairs, retain_index), progress)
    if resume_from is not None:
        state = _resume(run, resume_from, progress)
    else:
        state = _start(run, progress)
    for epoch in range(state.epoch + 1, config.epochs + 1):
        lr, seconds = _train_epoch(run, state, epoch, progress)
        _end_epoch(run, state, epoch, lr, seconds, progress)
    return _finish(run, state, note, progress)


@dataclass
class _Run:
    """What one run trains with, set up once by `_setup`."""

    config: FinetuneConfig
    spec: ModelSpec
    device: str
    model: Any  # the open_clip model being trained, adapters in place, on `device`
    tokenizer: Any
    plain: Any  # a frozen copy without adapters, on the CPU: the best epoch is merged into it
    model_cfg: dict  # what the saved directory is rebuilt from
    preprocess_cfg: dict
    adapted: Any  # what the method changed (recorded in the log)
    train: Split
    val: Split
    skipped: list
    fingerprint: str  # of the data, checked on --resume
    params: list  # (name, parameter) of everything trainable
    optimizer: Any
    scaler: Any  # a GradScaler for fp16, else None
    autocast: Any  # () -> the mixed-precision context (a null one in fp32)
    encode: TrainEncoder
    steps_per_epoch: int
    total_steps: int
    warmup: int
    groups: Any  # per training caption, its file (torch, on `device`): no negatives within a file
    captions_of: list  # per training file, the indices of its captions
    retention: Any  # replay.Retention: general pairs the WiSE-FT mix must keep, and replays
    fit: Split  # what the steps draw from: `train`, then the replayed retention pairs
    plan: Any  # replay.Plan: which replayed captions join each step
    start_state: dict  # the trainable tensors before training (the base model)
    best_state: dict | None = None  # and at the best epoch so far

    @property
    def out(self) -> Path:
        return self.config.out

    @property
    def ckpt_root(self) -> Path:
        return self.config.out / CHECKPOINT_DIR

    def checkpoint(self, state: TrainState) -> Path:
        # the best epoch's trainable tensors, unless they are the current or the starting ones
        best = self.best_state if state.best_epoch not in (0, state.epoch) else None
        return save_checkpoint(
            self.ckpt_root, self.model, self.optimizer, self.scaler, self.config,
            self.fingerprint, state, best=best,
        )  # fmt: skip

    def write_log(self, state: TrainState, finished: bool = False) -> None:
        write_log(
            self.out, self.config, self.spec, self.adapted, self.train, self.val, self.skipped,
            state, finished=finished,
        )  # fmt: skip

    def install_best(self) -> None:
        install_best(self.plain, self.model, self.model_cfg, self.preprocess_cfg, self.out)


# --- setting up -------------------------------------------------------------------------------


def _setup(spec, config, pairs, val_pairs, retention, progress) -> _Run:
    """Load the base model, prepare the data, adapt the model for the method, build the optimizer
    and cache what frozen parts compute."""
    from ..encoders.clip import _prep_from, pick_device
    from . import replay
    from .methods import apply_method, trainable_state
    from .retention import retention_pairs

    device = pick_device(config.device)
    amp_dtype = autocast_dtype(device, config.precision)
    model, tokenizer, model_cfg = _load_base(spec, config, device, progress)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    prep = _prep_from(preprocess_cfg)
    train, val, skipped = prepare_data(pairs, val_pairs, prep, tokenizer, config, progress)
    progress(
        "data", train_pairs=len(train.file_of), train_files=len(train.files),
        val_pairs=len(val.file_of), val_files=len(val.files), skipped=counts(skipped),
    )  # fmt: skip
    # The method freezes parts and adds adapters; `plain` is the merged copy that gets saved.
    plain = frozen_copy(model)  # no adapters yet: safe to deep-copy
    adapted = apply_method(
        model, config.method, config.lora_rank, config.lora_alpha, config.lora_targets,
        config.unlocked_text_layers, config.unlocked_image_layers,
    )  # fmt: skip
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scaler, autocast = make_optimizer(params, config, device, amp_dtype)
    encode = TrainEncoder(model, device, prep, autocast, config, amp_dtype, progress)
    encode.cache_frozen_prefixes(train, val, progress=progress)
    started = time.perf_counter()
    retained = retention_pairs(*retention, train, val, encode, prep, tokenizer, progress)
    kept = replay.prepare(*retained, train, val, encode, prep, tokenizer, progress, started)
    kept.per_step = replay.per_step(config.replay, config.batch_size * config.grad_accum,
                                    kept.replay)  # fmt: skip
    replayed = [kept.replay] if kept.per_step else []
    data_fingerprint = fingerprint(train, val, *replayed)
    steps_per_epoch, total_steps, warmup = schedule(config, train, kept.per_step)
    fit = replay.join(train, kept.replay if replayed else None)
    plan = replay.Plan(kept.per_step, len(train.file_of), len(fit.file_of) - len(train.file_of),
                       steps_per_epoch, config.seed)  # fmt: skip
    return _Run(
        config=config, spec=spec, device=device, model=model, tokenizer=tokenizer, plain=plain,
        model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, adapted=adapted,
        train=train, val=val, skipped=skipped, fingerprint=data_fingerprint,
        params=params, optimizer=optimizer, scaler=scaler, autocast=autocast, encode=encode,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup=warmup,
        groups=_groups(fit, device), captions_of=captions_by_file(train), retention=kept, fit=fit,
        plan=plan, start_state=_clone(trainable_state(model)),
    )  # fmt: skip


def _load_base(spec, config, device, progress):
    """(the base model on the CPU, its tokenizer, the config its saved copies are built from),
    seeded so that random-init towers and adapter inits repeat."""
    import torch

    from ..encoders.clip import create_open_clip

    progress("load_model", model=str(spec), device=device)
    torch.manual_seed(config.seed)
    model, tokenizer, _ = create_open_clip(spec, device="cpu")  # ModelError if it cannot load
    return model, tokenizer, output_model_cfg(spec, model)


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _groups(train: Split, device: str):
    import torch

    return torch.from_numpy(train.file_of).to(device)


def _start(run: _Run, progress) -> TrainState:
    """A fresh run: evaluate the base model, write it as the best so far, and the log."""
    state = TrainState()
    run.best_state = run.start_state
    before = run.encode.recall(run.val)
    state.before = state.best = before.to_dict()
    state.history.append({"epoch": 0, "train_loss": None, "recall": before.to_dict()})
    progress("eval", epoch=0, recall=before)
    run.install_best()
    if hasattr(run.tokenizer, "save_pretrained"):
        # open_clip loads a local-dir model's Hugging Face tokenizer from the directory itself
        run.tokenizer.save_pretrained(str(run.out))
    run.write_log(state)
    return state


def _resume(run: _Run, folder: Path, progress) -> TrainState:
    """Continue from the checkpoint in `folder`: weights, optimizer, RNG and state."""
    state = load_checkpoint(
        folder, run.model, run.optimizer, run.scaler, run.config, run.fingerprint, run.device
    )
    from .methods import trainable_state

    run.plain.load_state_dict(load_weights(run.out / "open_clip_model.safetensors"))
    if state.best_epoch == 0:
        run.best_state = run.start_state
    elif state.best_epoch == state.epoch:
        run.best_state = _clone(trainable_state(run.model))
    else:
        run.best_state = {k: v.to(run.device) for k, v in load_best(folder).items()}
    progress("resume", epoch=state.epoch, step=state.global_step)
    return state


# --- training -----------------------------------------------------------------------------------


def _train_epoch(run: _Run, state: TrainState, epoch: int, progress) -> tuple[float, float]:
    """The optimizer steps of `epoch` not taken yet, checkpointing every `checkpoint_every`;
    (the last learning rate, seconds)."""
    from .methods import set_train_mode

    config = run.config
    order = _epoch_order(run, epoch)
    step_size = config.batch_size * config.grad_accum - run.plan.per_step
    set_train_mode(run.model)
    t_epoch = time.perf_counter()
    since_ckpt = 0
    lr = config.learning_rate
    for step_in_epoch in range(state.step_in_epoch, run.steps_per_epoch):
        t0 = time.perf_counter()
        idx = order[step_in_epoch * step_size : (step_in_epoch + 1) * step_size]
        idx = run.plan.batch(idx, epoch, step_in_epoch)  # with replayed retention pairs
        lr = lr_at(state.global_step, run.total_steps, run.warmup, config)
        loss = _optimizer_step(run, idx, lr)
        state.train_time += time.perf_counter() - t0
        state.train_samples += len(idx)
        state.global_step += 1
        state.step_in_epoch = step_in_epoch + 1
        state.loss_sum += loss * len(idx)
        state.loss_count += len(idx)
        state.step_losses.append(round(loss, 6))
        progress(
            "step", epoch=epoch, step=state.global_step, steps=run.total_steps, loss=loss, lr=lr,
            samples=state.train_samples,
        )  # fmt: skip
        since_ckpt += 1
        if (
            config.checkpoint_every
            and since_ckpt >= config.checkpoint_every
            and state.step_in_epoch < run.steps_per_epoch
        ):
            path = run.checkpoint(state)
            since_ckpt = 0
            progress("checkpoint", path=path, step=state.global_step)
    return lr, time.perf_counter() - t_epoch


def _epoch_order(run: _Run, epoch: int) -> np.ndarray:
    """The captions of `epoch` in training order (seeded per epoch, so a resume repeats it):
    every caption, or one drawn per file with `one_caption_per_file`."""
    config = run.config
    rng = np.random.default_rng([config.seed, epoch])
    if config.one_caption_per_file:
        return rng.permutation([c[rng.integers(len(c))] for c in run.captions_of])
    return rng.permutation(len(run.train.file_of))


def _optimizer_step(run: _Run, idx: np.ndarray, lr: float) -> float:
    """One optimizer step on the captions `idx` (in micro-batches); its loss."""
    import torch

    config, optimizer, scaler = run.config, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro = [idx[i : i + config.batch_size] for i in range(0, len(idx), config.batch_size)]
    logit_scale = getattr(run.model, "logit_scale", None)
    loss = accumulate(run.encode, micro, run.fit, run.groups, logit_scale, scaler, run.autocast)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for _, p in run.params], config.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if logit_scale is not None:
        with torch.no_grad():
            logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    if run.device.startswith("cuda"):
        torch.cuda.synchronize()
    return loss


def _end_epoch(run: _Run, state: TrainState, epoch: int, lr: float, seconds: float, progress):
    """Evaluate on the held-out files, keep the model if it is the best so far, checkpoint."""
    recall = run.encode.recall(run.val)
    train_loss = state.loss_sum / max(1, state.loss_count)
    state.history.append({
        "epoch": epoch, "train_loss": round(train_loss, 6), "lr": lr, "recall": recall.to_dict(),
        "seconds": round(seconds, 3),
    })  # fmt: skip
    if recall.mean > Recall.from_dict(state.best).mean:
        from .methods import trainable_state

        state.best, state.best_epoch = recall.to_dict(), epoch
        run.best_state = _clone(trainable_state(run.model))
        run.install_best()
    state.epoch, state.step_in_epoch, state.loss_sum, state.loss_count = epoch, 0, 0.0, 0
    path = run.checkpoint(state)
    run.write_log(state)
    progress("checkpoint", path=path, step=state.global_step)
    progress(
        "epoch", epoch=epoch, epochs=run.config.epochs, loss=train_loss, recall=recall,
        best_epoch=state.best_epoch, samples_per_s=state.samples_per_s,
    )  # fmt: skip


def _finish(run: _Run, state: TrainState, note: str | None, progress) -> FinetuneResult:
    """Draw the curve, write the final log, drop the checkpoint; what the run did."""
    from .wise import wise_ft

    config, kept = run.config, run.retention
    started = time.perf_counter()
    mix = wise_ft(run.encode, run.model, run.start_state, run.best_state, run.val, kept.measure,
                  config.max_forgetting, progress)  # fmt: skip
    mix.retention = kept.source
    kept.mix_seconds = time.perf_counter() - started if kept.measure is not None else 0.0
    kept.samples = kept.per_step * state.global_step
    state.wise = {**mix.to_dict(), "retention": kept.to_dict()}
    if mix.alpha != 1.0:
        run.install_best()  # the model now holds the chosen mix
    curve = plot_curve(state, run.out / CURVE_NAME) if config.plot else None
    if config.plot and curve is None:
        note = f"{note}; {PLOT_HINT}" if note else PLOT_HINT
    run.write_log(state, finished=True)
    if not config.keep_checkpoint:
        shutil.rmtree(run.ckpt_root, ignore_errors=True)
    progress("done", out=run.out)
    return FinetuneResult(
        out=run.out,
        method=config.method,
        before=Recall.from_dict(state.before),
        after=Recall.from_dict(state.best),
        best_epoch=state.best_epoch,
        epochs=config.epochs,
        history=state.history,
        skipped=counts(run.skipped),
        train_pairs=len(run.train.file_of),
        train_files=len(run.train.files),
        val_pairs=len(run.val.file_of),
        val_files=len(run.val.files),
        samples_per_s=state.samples_per_s,
        train_seconds=state.train_time,
        curve=curve,
        model=run.plain,
        note=note,
        feature_cache=run.encode.cache.stats.to_dict(),
        mix=mix,
        retention=kept,
    )
