"""`mmsearch finetune`: fine-tune a model's alignment on (file, caption) pairs.

The options that are plain `FinetuneConfig` fields are the table `TRAINING`: one line per option,
its type and default taken from the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import ModelSpec, index_root
from ..finetune.config import FinetuneConfig
from .app import app, emit_json, fail, handle_errors, say
from .flags import flag, with_flags
from .options import Debug, Device, Json
from .pairs import Pairs, PairsReading, recall_table, say_pairs_notes, say_skipped
from .progress import Progress, mode_for

TRAINING = (
    flag("method", "head, lora, lock-image or full."),
    flag("epochs", "Passes over the pairs.", min=1),
    flag("batch_size", "Pairs per step; each pair's negatives are the others in the batch.",
         "--batch-size", "-b", min=2),
    flag("grad_accum", "Batches per optimizer step (a larger contrastive batch).", min=1),
    flag("one_caption_per_file", "Each epoch visits every file once with one of its captions "
         "(a seeded draw) instead of every pair.", "--one-caption"),
    flag("lr", "Peak learning rate (default depends on --method)."),
    flag("weight_decay", "AdamW weight decay (not on gains and biases)."),
    flag("warmup_steps", "Learning-rate warmup in optimizer steps (default: --warmup-fraction)."),
    flag("warmup_fraction", "Share of all optimizer steps spent warming up."),
    flag("min_lr_fraction", "The cosine schedule decays to --lr times this."),
    flag("max_grad_norm", "Clip the gradient norm to this (0: no clipping)."),
    flag("unlocked_text_layers", "--method lock-image: train only the text tower's last N blocks "
         "(and its final norm and projection); default: all of it."),
    flag("unlocked_image_layers", "--method lock-image: the image tower's last N layer groups "
         "train too; 0 keeps it locked."),
    flag("lora_rank", "Rank of the LoRA adapters (--method lora).", min=1),
    flag("lora_alpha", "LoRA scale numerator (default: 2 x --lora-rank)."),
    flag("val_fraction", "Files held out for evaluation."),
    flag("seed", "Seed of the split, the shuffles and the inits."),
    flag("grad_checkpointing", "Recompute activations: less memory, slower steps."),
    flag("precision", "auto (mixed precision on CUDA and on CPUs with native bf16, else fp32), "
         "fp32, bf16 or fp16 (autocast; fp16 adds loss scaling). Weights stay fp32."),
    flag("workers", "Image decoding threads (default: the core count, at most 8)."),
    flag("image_cache_mb", "Decoded images kept in memory up to this size; beyond it they are "
         "decoded per batch."),
    flag("checkpoint_every", "Optimizer steps between checkpoints (0: at each epoch end)."),
    flag("keep_checkpoint", "Keep OUT/checkpoint after a finished run."),
    flag("max_forgetting", "With --retain: the largest relative drop of the retention pairs' "
         "mean recall the kept WiSE-FT mix of base and fine-tuned weights may cost."),
    flag("replay", "With retention pairs (--retain, or the set built from --index): the share of "
         "each batch taken from half of their files, so the model learns your pairs without "
         "drifting on general ones; the other half measures forgetting. 0: no replay."),
    flag("plot", "Draw the loss and recall curve (OUT/curve.png).", "--plot/--no-plot"),
    flag("resume", "Continue an interrupted run."),
    flag("overwrite", "Replace --out."),
)  # fmt: skip


@app.command()
@handle_errors
@with_flags(FinetuneConfig, TRAINING)
@PairsReading.options
def finetune(
    source: Pairs,
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model to start from (any --model spec).")
    ] = "ViT-B-32",
    val: Annotated[
        Path | None,
        typer.Option("--val", help="Separate held-out pairs (instead of --val-fraction)."),
    ] = None,
    retain: Annotated[
        Path | None,
        typer.Option(
            "--retain",
            help="General pairs whose retrieval must not degrade: the model kept is the mix of "
            "the base and fine-tuned weights (WiSE-FT) with the best held-out recall among those "
            "within --max-forgetting on these. Default: pairs built from the photos of --index "
            "(each generic query's best photo under the base model) when it exists.",
        ),
    ] = None,
    index: Annotated[
        str,
        typer.Option("--index", "-i", help="Index whose photos give the default retention set."),
    ] = "default",
    lora_targets: Annotated[
        str | None, typer.Option("--lora-targets", help="Comma-separated layer names.")
    ] = None,
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
    reading: PairsReading = PairsReading(),  # noqa: B008 - the four options in its place
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
    **training,
):
    """Fine-tune the alignment on your own (file, caption) pairs; keeps the best epoch."""
    from ..finetune import finetune as run_finetune
    from ..finetune.audio import TOWERS
    from ..finetune.evaluate import small_split_warning

    if audio_tower not in TOWERS:
        fail(f"unknown --audio-tower {audio_tower!r}; use one of: {', '.join(TOWERS)}")
    if lora_targets:
        training["lora_targets"] = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    training["feature_cache"] = reading.cache_dir()
    config = FinetuneConfig(model=model, out=out, device=device, **training)
    from ..records import AUDIO, IMAGE

    pairs = reading.read(source)
    val_pairs = reading.read(val) if val is not None else None
    retain_pairs = reading.read(retain, captions=False) if retain is not None else None
    has_audio = bool(pairs.of(AUDIO).pairs)
    result = audio = None
    with Progress(mode_for(as_json)) as progress:
        if pairs.of(IMAGE).pairs or not has_audio:
            result = run_finetune(
                pairs, config, progress=progress, val_pairs=val_pairs, retain_pairs=retain_pairs,
                retain_index=(index_root(), index),
            )  # fmt: skip
        if has_audio:
            # Audio pairs train the audio projector against the (tuned) CLIP text tower; it is
            # saved in the model directory, where indexing with --model picks it up.
            from ..encoders.clip import materialize_model_dir
            from ..finetune.audio import HeadSettings, train_audio_projector

            if result is None:
                materialize_model_dir(ModelSpec.parse(model), config.out, config.overwrite)
            audio = train_audio_projector(
                pairs,
                config.out,
                audio_model,
                cache_dir=index_root() / ".models",
                val_fraction=max(config.val_fraction, 0.1),
                seed=config.seed,
                device=device,
                progress=progress,
                val_pairs=val_pairs if val_pairs is not None and val_pairs.of(AUDIO) else None,
                tower=audio_tower,
                head_settings=HeadSettings(
                    steps=audio_steps, batch_size=config.batch_size, seed=config.seed
                ),
            )
    # With image pairs the image run reports the pairs left out (missing files, empty captions,
    # of any modality); with audio pairs only, they are reported here.
    unread = pairs.skipped_counts() if result is None else {}
    warning = small_split_warning(result.after) if result is not None else None
    if as_json:
        data = result.to_dict() if result else {"out": str(config.out)}
        if unread:
            data["skipped"] = unread
        if warning:
            data["warnings"] = [warning]
        data["outside"] = [str(p) for p in pairs.outside]
        if audio is not None:
            data["audio"] = audio.to_dict()
        emit_json(data)
        return
    _say_result(pairs, result, audio, warning, unread, config.out)


def _say_result(pairs, result, audio, warning, unread, out) -> None:
    """The text report of a run: notes and warnings on stderr, what was trained and kept."""
    say_pairs_notes(pairs)
    if result is not None and result.note:
        say(result.note, err=True)
    if warning:
        say(f"mmsearch: warning: {warning}; hold out more (--val-fraction, --val)", err=True)
    say_skipped(unread)
    if audio is not None:
        _say_audio(audio)
    if result is None:
        say(f"re-index with it: mmsearch index PATH --model {out} --rebuild")
        return
    say(
        f"{result.method}: {result.train_pairs} training pairs ({result.train_files} files), "
        f"{result.val_pairs} held out ({result.val_files} files); "
        f"{result.samples_per_s:.1f} samples/s"
    )
    kept = "the model before training" if result.best_epoch == 0 else f"epoch {result.best_epoch}"
    say(
        recall_table(
            result.before,
            result.after,
            names=[
                "before",
                "kept" if result.best_epoch == 0 else f"kept: epoch {result.best_epoch}",
            ],
        )
    )
    kept = _say_mix(result.mix, result.retention, kept)
    say(f"kept {kept}; wrote {result.out}" + (f" (curve: {result.curve})" if result.curve else ""))
    say_skipped(result.skipped)
    say(f"re-index with it: mmsearch index PATH --model {result.out} --rebuild")


def _say_mix(mix, retention, kept: str) -> str:
    """The WiSE-FT report (or why there is none) and the retention set's; what was kept, in
    words."""
    if retention is not None and retention.source is not None:
        say(retention.line())
    if mix is None or not mix.measured:
        if mix is not None and mix.note:
            say(mix.note, err=True)
        return kept
    names = ["base", "fine-tuned", f"mix {mix.alpha:g}"]
    for what, label in (("target", "held-out pairs"), ("retention", f"retention: {mix.retention}")):
        say(f"{label}:")
        say(recall_table(*mix.recalls(what).values(), names=names))
    row = mix.row(mix.alpha)
    say(f"retention recall lost by the mix: {row['forgetting']:.1%} "
        f"(--max-forgetting {mix.max_forgetting:g})")  # fmt: skip
    return f"the WiSE-FT mix at {mix.alpha:g} of the base and {kept}"


def _say_audio(audio) -> None:
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
    say(recall_table(*recalls, names=names, audio=True))
    say_skipped(audio.skipped, audio=True)
