"""What a fine-tuning run writes to `config.out`, and reads back on --resume.

    open_clip_config.json, open_clip_model.safetensors  the best epoch, adapters merged
    training_log.json                                   config, data counts, per-epoch history
    curve.png                                           loss and recall curves (the `plot` extra)
    checkpoint/                                         while training (kept with keep_checkpoint)

A checkpoint holds the trainable weights, the optimizer, the RNG, the config and the TrainState,
written to a fresh folder and then pointed to by an atomically replaced `latest.json`, so an
interrupt at any moment leaves the previous one intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelSpec
from ..errors import UsageError
from .config import FORMAT_VERSION, RESUME_FREE, FinetuneConfig
from .data import counts

LOG_NAME = "training_log.json"
CURVE_NAME = "curve.png"
CHECKPOINT_DIR = "checkpoint"
BEST_NAME = "best.safetensors"


@dataclass
class TrainState:
    """Where a run is, and what it has measured: saved in every checkpoint and in the log."""

    epoch: int = 0  # the last finished epoch
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0  # over the current epoch
    loss_count: int = 0
    history: list[dict] = field(default_factory=list)  # per epoch, 0 = before training
    step_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best: dict | None = None  # Recall.to_dict() of the best epoch
    before: dict | None = None  # and of the model before training
    train_time: float = 0.0
    train_samples: int = 0
    wise: dict | None = None  # the WiSE-FT mix kept at the end (wise.MixReport.to_dict())

    @property
    def samples_per_s(self) -> float:
        return self.train_samples / max(self.train_time, 1e-9)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def output_model_cfg(spec: ModelSpec, model) -> dict:
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


def install_best(plain, model, model_cfg, preprocess_cfg, out: Path) -> None:
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


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- checkpoints --------------------------------------------------------------------------------------


def check_out_dir(
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


def save_checkpoint(
    ckpt_root, model, optimizer, scaler, config, fingerprint, state, best=None
) -> Path:
    """A new checkpoint folder; `best`: the best epoch's trainable tensors, when they are
    neither the current ones nor the starting ones (for the WiSE-FT mix after a resume)."""
    import torch
    from safetensors.torch import save_file

    from .methods import trainable_state

    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.global_step:08d}-{secrets.token_hex(3)}"
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
    if best is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in best.items()},
                  str(tmp / BEST_NAME))  # fmt: skip
    state = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "fingerprint": fingerprint,
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": state.to_dict(),
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


def load_best(folder: Path) -> dict:
    """The best epoch's trainable tensors saved with the checkpoint in `folder`."""
    return load_weights(folder / BEST_NAME)


def load_checkpoint(
    folder: Path, model, optimizer, scaler, config, fingerprint, device
) -> TrainState:
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
    weights = load_weights(folder / "trainable.safetensors")
    missing = [k for k in weights if k not in model.state_dict()]
    if missing:
        raise UsageError(
            f"checkpoint {folder} does not match the model ({len(missing)} unknown weights)"
        )
    model.load_state_dict(weights, strict=False)
    tensors = load_weights(folder / "optimizer.safetensors")
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
    return TrainState(**saved["state"])


def write_log(out, config, spec, adapted, train, val, skipped, state, finished: bool) -> None:
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
            "skipped": counts(skipped),
            "skipped_examples": [{"where": s.where, "reason": s.reason} for s in skipped[:50]],
        },  # fmt: skip
        "before": state.before,
        "best_epoch": state.best_epoch,
        "best": state.best,
        "samples_per_s": state.samples_per_s,
        "history": state.history,
        "step_losses": state.step_losses,
        "wise": state.wise,
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


def plot_curve(state: TrainState, path: Path) -> Path | None:
    """Loss and recall curves as a PNG; None when matplotlib (the `plot` extra) is missing.

    Matplotlib's object API (a Figure on its own Agg canvas, no pyplot): the caller's backend
    and pyplot's global figures are left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    hist = state.history
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_rec = fig.subplots(1, 2)
    losses = state.step_losses
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
    ax_rec.axvline(state.best_epoch, color="grey", lw=0.8, ls=":")
    ax_rec.set(
        xlabel="epoch (0 = before)", ylabel="held-out recall", title="held-out recall", ylim=(0, 1)
    )
    ax_rec.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
