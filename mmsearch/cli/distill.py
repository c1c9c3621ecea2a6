"""`mmsearch distill-text`: a query tower for other languages (finetune.distill)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..config import DEFAULT_INDEX, DEFAULT_MODEL, EncoderOptions, ModelSpec
from ..errors import ModelMismatchError, UsageError
from .app import app, emit_json, handle_errors, resolve_root, say
from .options import Debug, Device, IndexDir, Json
from .progress import rich_bar

if TYPE_CHECKING:
    from ..encoders import EncoderIdentity


@app.command("distill-text")
@handle_errors
def distill_text(
    sentences: Annotated[
        Path,
        typer.Argument(
            help="Sentences in the model's language, one a line, and/or 'sentence<TAB>"
            "translation' lines (more tabs: more translations of the sentence).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the tower to.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="The CLIP model to align to (any --model spec). Default: --index's model.",
            show_default=False,
        ),
    ] = None,
    index_name: Annotated[
        str,
        typer.Option("--index", "-i", help="Align to this index's model (when no --model)."),
    ] = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    student: Annotated[
        str | None,
        typer.Option(
            "--student",
            help="sentence-transformers model to train (name or directory). Default: "
            "paraphrase-multilingual-MiniLM-L12-v2 (50+ languages).",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the sentences.")] = 10,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Sentences per step.")
    ] = 32,
    lr: Annotated[
        float, typer.Option("--lr", help="Learning rate of the student's own layers.")
    ] = 5e-5,
    head_lr: Annotated[
        float, typer.Option("--head-lr", help="Learning rate of the fresh Dense layer.")
    ] = 1e-2,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            min=0.0,
            max=0.5,
            help="Sentences held out (with their translations) to measure agreement.",
        ),
    ] = 0.1,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="Held-out (image, caption) pairs, as finetune reads them: text->image recall "
            "with the tower's queries beside the model's own.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and the init.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Train a query tower that puts sentences in other languages where the model's own text
    tower puts their English (multilingual knowledge distillation); use it with
    `mmsearch search --query-model OUT` or `mmsearch index --query-model OUT`."""
    from ..encoders import create_encoder
    from ..finetune.distill import DEFAULT_STUDENT, DistillConfig, distill, read_sentences
    from ..finetune.pairs import read_pairs

    text = read_sentences(sentences)
    held_pairs = read_pairs(pairs) if pairs is not None else None
    identity = None if model is not None else _index_identity(index_dir, index_name)
    spec = ModelSpec.parse(model or (identity.spec if identity else DEFAULT_MODEL))
    config = DistillConfig(
        out=out,
        student=student or DEFAULT_STUDENT,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        head_lr=head_lr,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
        overwrite=overwrite,
    )
    with _Progress(not as_json and sys.stderr.isatty()) as progress:
        progress("load_model")
        teacher = create_encoder(spec, EncoderOptions(device=device))
        if identity is not None and teacher.identity.key != identity.key:
            raise ModelMismatchError(
                f"the model at {identity.spec} changed since index {index_name!r} was built; "
                "a tower distilled from it would not fit the index"
            )
        result = distill(text, teacher, config, pairs=held_pairs, progress=progress)
    if as_json:
        emit_json({**result.to_dict(), "skipped_lines": text.skipped})
        return
    if text.skipped:
        say(f"skipped {text.skipped} lines with no sentence before the tab", err=True)
    say(
        f"{result.train_rows} sentences and translations trained on; {result.val_sentences} "
        f"sentences and {result.val_translations} translations held out"
    )
    _agreement_table(result)
    kept = "the untrained student" if result.best_epoch == 0 else f"epoch {result.best_epoch}"
    say(f"kept {kept}; wrote {result.out} (aligned to {result.teacher}, {result.seconds:.0f}s)")
    say(f"search with it: mmsearch search QUERY --query-model {result.out}")


def _index_identity(index_dir: Path | None, name: str) -> EncoderIdentity | None:
    """The index's model identity, or None when there is no such index (then the default model)."""
    from ..storage.collection import Collection
    from ..storage.layout import list_indexes

    root = resolve_root(index_dir)
    if name not in list_indexes(root):
        if name != DEFAULT_INDEX:
            raise UsageError(f"no index {name!r} under {root}; name one that exists or --model")
        return None
    with Collection.open_reader(root, name) as col:
        return col.encoder_identity


def _agreement_table(result) -> None:
    say(f"{'agreement with the model (cosine)':<36}{'before':>10}{'after':>10}")
    b, a = result.before, result.after
    say(f"{'  held-out sentences':<36}{b.sentences:>10.3f}{a.sentences:>10.3f}")
    if a.translations is not None:
        say(f"{'  held-out translations':<36}{b.translations:>10.3f}{a.translations:>10.3f}")
    if result.recall_teacher is not None:
        say(f"{'text->image recall':<36}{'model':>10}{'tower':>10}")
        t, s = result.recall_teacher.text_to_image, result.recall_student.text_to_image
        for k in sorted(t):
            say(f"{f'  R@{k}':<36}{t[k]:>10.3f}{s[k]:>10.3f}")


class _Progress:
    """On a terminal: a bar over the training steps and a line per epoch's agreement."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = self.task = None

    def __enter__(self):
        if self.enabled:
            self.bar = rich_bar()
        return self

    def __call__(self, event: str, **info) -> None:
        if self.bar is None:
            return
        if event == "step":
            desc = f"epoch {info['epoch']} loss {info['loss']:.4f}"
            if self.task is None:
                self.task = self.bar.add_task(desc, total=info["steps"])
            self.bar.update(self.task, completed=info["step"], description=desc)
        elif event == "eval":
            a = info["agreement"]
            more = "" if a.translations is None else f", translations {a.translations:.3f}"
            self.bar.console.print(
                f"epoch {info['epoch']}: agreement {a.sentences:.3f}{more}", style="dim"
            )
        else:
            self.bar.console.print(event.replace("_", " "), style="dim", end="\r")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
