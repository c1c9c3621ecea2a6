"""`mmsearch eval`: retrieval recall of a model on (file, caption) pairs."""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from ..config import index_root
from .app import app, emit_json, handle_errors, say
from .options import Debug, Device, Json
from .pairs import Pairs, PairsReading, recall_table, say_pairs_notes, say_skipped
from .progress import Progress, mode_for


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@app.command("eval")
@handle_errors
@PairsReading.options
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
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="fp32, or bf16 / fp16 (faster where the device has them; recall moves a little).",
        ),
    ] = Precision.fp32,
    reading: PairsReading = PairsReading(),  # noqa: B008 - the four options in its place
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Retrieval recall@1/5/10 of a model on your pairs: image->text and text->image for image
    pairs, audio->text and text->audio for audio pairs (with the audio tower and projector that
    indexing with --model uses)."""
    from ..finetune import evaluate
    from ..finetune.evaluate import small_split_warning
    from ..records import AUDIO, IMAGE

    pairs = reading.read(source)
    recall = audio = warning = None
    if pairs.of(IMAGE).pairs or not pairs.of(AUDIO).pairs:
        with Progress(mode_for(as_json)) as progress:
            recall = evaluate(
                pairs, model, device=device, precision=precision.value, batch_size=batch_size,
                progress=progress, feature_cache=reading.cache_dir(),
            )  # fmt: skip
        warning = small_split_warning(recall)
    if pairs.of(AUDIO).pairs:
        from ..finetune.audio import evaluate_audio

        audio = evaluate_audio(
            pairs, model, audio_model, cache_dir=index_root() / ".models", device=device
        )
    # what was left out: the pairs file's bad rows, and files that did not decode
    skipped = recall.skipped if recall else pairs.skipped_counts()
    if as_json:
        data = {
            "model": model,
            "precision": precision.value,
            **(recall.to_dict() if recall else {}),
        }
        if warning:
            data["warnings"] = [warning]
        if audio is not None:
            data["audio"] = audio.to_dict()
        data["skipped"] = skipped
        data["outside"] = [str(p) for p in pairs.outside]
        emit_json(data)
        return
    say_pairs_notes(pairs)
    say_skipped(skipped)
    if warning:
        say(f"mmsearch: warning: {warning}", err=True)
    if recall is not None:
        say(
            f"{model}: {recall.images} images, {recall.texts} distinct captions ({precision.value})"
        )
        say(recall_table(recall))
    if audio is not None:
        say(f"{model}: {audio.images} audio files, {audio.texts} distinct captions")
        say(recall_table(audio, audio=True))
        say_skipped(audio.skipped, audio=True)
