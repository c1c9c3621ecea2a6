"""`mmsearch finetune` and `mmsearch eval`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..config import (
    ModelSpec,
    index_root,
)
from .app import (
    Debug,
    Device,
    Json,
    app,
    emit_json,
    fail,
    handle_errors,
    say,
)
from .progress import rich_bar

Pairs = Annotated[
    Path,
    typer.Argument(
        help="CSV/TSV/JSONL of (path, caption) pairs, or a folder of files with sidecar .txt "
        "captions (a.jpg + a.txt).",
        show_default=False,
    ),
]
AllowOutside = Annotated[
    bool,
    typer.Option(
        "--allow-outside",
        help="Read relative paths that lead outside the pairs file's folder (../); without it "
        "those pairs are skipped. Absolute paths are always read and listed.",
    ),
]


def _pairs_notes(pairs) -> str | None:
    """The files a pairs file pulled in from outside its folder, for stderr."""
    if not pairs.outside:
        return None
    shown = ", ".join(str(p) for p in pairs.outside[:3])
    more = f" and {len(pairs.outside) - 3} more" if len(pairs.outside) > 3 else ""
    return f"read {len(pairs.outside)} files from outside the pairs file's folder: {shown}{more}"


def _skipped_line(counts: dict) -> str:
    from ..finetune.pairs import OUTSIDE

    line = "skipped pairs: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return line + (" (--allow-outside reads them)" if OUTSIDE in counts else "")


@app.command()
@handle_errors
def finetune(
    source: Pairs,
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model to start from (any --model spec).")
    ] = "ViT-B-32",
    method: Annotated[
        str, typer.Option("--method", help="head, lora, lock-image or full.")
    ] = "head",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the pairs.")] = 5,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            "-b",
            min=2,
            help="Pairs per step; each pair's negatives are the others in the batch.",
        ),
    ] = 64,
    lr: Annotated[float | None, typer.Option("--lr", help="Default depends on --method.")] = None,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay (not on gains and biases).")
    ] = 0.1,
    warmup_steps: Annotated[
        int | None,
        typer.Option("--warmup-steps", help="Learning-rate warmup (default: 10% of the steps)."),
    ] = None,
    grad_accum: Annotated[
        int,
        typer.Option(
            "--grad-accum", min=1, help="Batches per optimizer step (a larger contrastive batch)."
        ),
    ] = 1,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Files held out for evaluation.")
    ] = 0.1,
    val: Annotated[
        Path | None,
        typer.Option("--val", help="Separate held-out pairs (instead of --val-fraction)."),
    ] = None,
    lora_rank: Annotated[
        int, typer.Option("--lora-rank", min=1, help="Rank of the LoRA adapters (--method lora).")
    ] = 8,
    lora_targets: Annotated[
        str | None, typer.Option("--lora-targets", help="Comma-separated layer names.")
    ] = None,
    grad_checkpointing: Annotated[
        bool,
        typer.Option(
            "--grad-checkpointing", help="Recompute activations: less memory, slower steps."
        ),
    ] = False,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (mixed precision on CUDA and on CPUs with native bf16, else fp32), fp32, "
            "bf16 or fp16 (autocast; fp16 adds loss scaling). Weights stay fp32.",
        ),
    ] = "auto",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the split, the shuffles and the inits.")
    ] = 0,
    audio_model: Annotated[
        str | None,
        typer.Option(
            "--audio-model",
            help="CLAP model whose projector audio pairs train (default: the one --model's "
            "directory carries, else laion/clap-htsat-unfused).",
        ),
    ] = None,
    audio_tower: Annotated[
        str,
        typer.Option(
            "--audio-tower",
            help="Audio pairs: 'head' also trains CLAP's audio projection head (the MLP after "
            "the frozen HTSAT trunk) with the projector, kept if it beats the projector alone "
            "on held-out recall and saved in OUT/audio_model; 'none' trains the projector only.",
        ),
    ] = "none",
    audio_steps: Annotated[
        int,
        typer.Option("--audio-steps", min=1, help="Training steps of --audio-tower head."),
    ] = 300,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
    allow_outside: AllowOutside = False,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Fine-tune the alignment on your own (file, caption) pairs; keeps the best epoch."""
    from ..finetune import FinetuneConfig, read_pairs
    from ..finetune import finetune as run_finetune
    from ..finetune.audio import TOWERS

    if audio_tower not in TOWERS:
        fail(f"unknown --audio-tower {audio_tower!r}; use one of: {', '.join(TOWERS)}")
    extra = {}
    if lora_targets:
        extra["lora_targets"] = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    config = FinetuneConfig(
        model=model,
        out=out,
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        grad_accum=grad_accum,
        val_fraction=val_fraction,
        lora_rank=lora_rank,
        grad_checkpointing=grad_checkpointing,
        precision=precision,
        device=device,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        **extra,
    )
    from ..records import AUDIO, IMAGE

    pairs = read_pairs(source, allow_outside=allow_outside)
    val_pairs = read_pairs(val, allow_outside=allow_outside) if val is not None else None
    has_audio = bool(pairs.of(AUDIO).pairs)
    result = audio = None
    with _TrainProgress(not as_json and sys.stderr.isatty()) as progress:
        if pairs.of(IMAGE).pairs or not has_audio:
            result = run_finetune(pairs, config, progress=progress, val_pairs=val_pairs)
        if has_audio:
            # Audio pairs train the audio projector against the (tuned) CLIP text tower; it is
            # saved in the model directory, where indexing with --model picks it up.
            from ..encoders.clip import materialize_model_dir
            from ..finetune.audio import HeadSettings, train_audio_projector

            if result is None:
                materialize_model_dir(ModelSpec.parse(model), config.out, overwrite)
            audio = train_audio_projector(
                pairs,
                config.out,
                audio_model,
                cache_dir=index_root() / ".models",
                val_fraction=max(val_fraction, 0.1),
                seed=seed,
                device=device,
                progress=progress,
                val_pairs=val_pairs if val_pairs is not None and val_pairs.of(AUDIO) else None,
                tower=audio_tower,
                head_settings=HeadSettings(steps=audio_steps, batch_size=batch_size, seed=seed),
            )
    # With image pairs the image run reports the pairs left out (missing files, empty captions,
    # of any modality); with audio pairs only, they are reported here.
    unread = pairs.skipped_counts() if result is None else {}
    if as_json:
        data = result.to_dict() if result else {"out": str(config.out)}
        if unread:
            data["skipped"] = unread
        data["outside"] = [str(p) for p in pairs.outside]
        if audio is not None:
            data["audio"] = audio.to_dict()
        emit_json(data)
        return
    if _pairs_notes(pairs):
        say(_pairs_notes(pairs), err=True)
    if result is not None and result.note:
        say(result.note, err=True)
    if unread:
        say(_skipped_line(unread), err=True)
    if audio is not None:
        kept = {
            "before": "the previous projector",
            "after": "the fitted projector",
            "head": f"the trained audio head (step {audio.head_step}) and its projector",
        }[audio.kept]
        say(
            f"audio: {audio.train_pairs} training pairs, {audio.val_pairs} held out; "
            f"kept {kept} ({audio.projector}"
            + (f", {audio.audio_model}" if audio.audio_model else "")
            + ")"
        )
        if audio.head is not None:
            say(f"audio head: training loss {audio.head_loss[0]:.3f} -> {audio.head_loss[1]:.3f}")
        names = ["before", "projector"] + (["+ head"] if audio.head is not None else [])
        recalls = [audio.before, audio.after] + ([audio.head] if audio.head is not None else [])
        say(_recall_table(*recalls, names=names, audio=True))
        if audio.skipped:
            say(
                "skipped audio files: " + ", ".join(f"{v} {k}" for k, v in audio.skipped.items()),
                err=True,
            )
    if result is None:
        say(f"re-index with it: mmsearch index PATH --model {config.out} --rebuild")
        return
    say(
        f"{result.method}: {result.train_pairs} training pairs ({result.train_files} files), "
        f"{result.val_pairs} held out ({result.val_files} files); "
        f"{result.samples_per_s:.1f} samples/s"
    )
    say(_recall_table(result.before, result.after))
    kept = "the model before training" if result.best_epoch == 0 else f"epoch {result.best_epoch}"
    say(f"kept {kept}; wrote {result.out}" + (f" (curve: {result.curve})" if result.curve else ""))
    if result.skipped:
        say(_skipped_line(result.skipped), err=True)
    say(f"re-index with it: mmsearch index PATH --model {result.out} --rebuild")


@app.command("eval")
@handle_errors
def eval_(
    source: Pairs,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model to evaluate (any --model spec).")
    ] = "ViT-B-32",
    audio_model: Annotated[
        str | None,
        typer.Option(
            "--audio-model",
            help="CLAP model for audio pairs (default: the one --model's directory carries, "
            "else laion/clap-htsat-unfused), as indexing with --model uses.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Files embedded per model call.")
    ] = 64,
    allow_outside: AllowOutside = False,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Retrieval recall@1/5/10 of a model on your pairs: image->text and text->image for image
    pairs, audio->text and text->audio for audio pairs (with the audio tower and projector that
    indexing with --model uses)."""
    from ..finetune import evaluate, read_pairs
    from ..records import AUDIO, IMAGE

    pairs = read_pairs(source, allow_outside=allow_outside)
    recall = audio = None
    if pairs.of(IMAGE).pairs or not pairs.of(AUDIO).pairs:
        recall = evaluate(pairs, model, device=device, batch_size=batch_size)
    if pairs.of(AUDIO).pairs:
        from ..finetune.audio import evaluate_audio

        audio = evaluate_audio(
            pairs, model, audio_model, cache_dir=index_root() / ".models", device=device
        )
    if as_json:
        data = {"model": model, **(recall.to_dict() if recall else {})}
        if audio is not None:
            data["audio"] = audio.to_dict()
        data["skipped"] = pairs.skipped_counts()
        data["outside"] = [str(p) for p in pairs.outside]
        emit_json(data)
        return
    if _pairs_notes(pairs):
        say(_pairs_notes(pairs), err=True)
    if pairs.skipped:
        say(_skipped_line(pairs.skipped_counts()), err=True)
    if recall is not None:
        say(f"{model}: {recall.images} images, {recall.texts} captions")
        say(_recall_table(recall))
    if audio is not None:
        say(f"{model}: {audio.images} audio files, {audio.texts} distinct captions")
        say(_recall_table(audio, audio=True))
        if audio.skipped:
            say(
                "skipped audio files: " + ", ".join(f"{v} {k}" for k, v in audio.skipped.items()),
                err=True,
            )


def _recall_table(*recalls, names: list[str] | None = None, audio: bool = False) -> str:
    names = names or (["before", "after"] if len(recalls) == 2 else ["recall"])
    rows = ["            " + "".join(f"{name:>22}" for name in names)]
    arrows = ("a->t", "t->a") if audio else ("i->t", "t->i")
    for direction, arrow in zip(("image_to_text", "text_to_image"), arrows, strict=True):
        for k in sorted(getattr(recalls[0], direction)):
            label = f"{arrow} R@{k}"
            rows.append(
                f"{label:<12}" + "".join(f"{getattr(r, direction)[k]:>22.3f}" for r in recalls)
            )
    return "\n".join(rows)


class _TrainProgress:
    """Training progress on a terminal: a bar over optimizer steps, a line per evaluation."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            self.bar = rich_bar()
        return self

    def __call__(self, event: str, **info) -> None:
        if self.bar is None:
            return
        if event == "step":
            desc = f"epoch {info['epoch']} loss {info['loss']:.3f}"
            if self.task is None:
                self.task = self.bar.add_task(desc, total=info["steps"])
            self.bar.update(self.task, completed=info["step"], description=desc)
        elif event == "eval" and "recall" in info:
            self.bar.console.print(
                f"epoch {info['epoch']}: mean recall {info['recall'].mean:.3f}", style="dim"
            )
        elif event == "audio-step":
            desc = f"audio head, loss {info['loss']:.3f}"
            if self.task is None:
                self.task = self.bar.add_task(desc, total=info["steps"])
            self.bar.update(self.task, completed=info["step"], description=desc)
        elif event == "audio-eval":
            self.bar.console.print(
                f"audio head step {info['step']}: mean recall {info['recall'].mean:.3f}",
                style="dim",
            )
        elif event in ("load_model", "decode", "features", "data"):
            detail = f" {info.get('done')}/{info.get('total')}" if "done" in info else ""
            self.bar.console.print(f"{event.replace('_', ' ')}{detail}", style="dim", end="\r")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


# --- info, failures, list ---------------------------------------------------------------------
