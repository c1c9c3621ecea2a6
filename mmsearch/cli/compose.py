"""`mmsearch compose`: a two-tower model from unimodal pretrained towers, ready to fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, emit_json, handle_errors, say
from .options import Debug, Json


def _per_channel(name: str):
    """--mean, --std: one value or R,G,B (read by `_floats`)."""
    return typer.Option(
        f"--{name}", help=f"Input {name}, one value or R,G,B (default: the tower's)."
    )


def _floats(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(x) for x in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: expected a number or R,G,B") from None


@app.command()
@handle_errors
def compose(
    image: Annotated[
        str,
        typer.Option(
            "--image",
            help="Image tower: timm:NAME[.TAG] (timm's pretrained weights), timm:NAME@FILE (a "
            "local weights file) or open_clip:SPEC:image.",
            show_default=False,
        ),
    ],
    text: Annotated[
        str,
        typer.Option(
            "--text",
            help="Text tower: hf:PATH_OR_ID, sentence-transformers:NAME or open_clip:SPEC:text.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    dim: Annotated[
        int, typer.Option("--dim", min=1, help="Size of the shared space (fresh projections).")
    ] = 256,
    context_length: Annotated[
        int, typer.Option("--context-length", min=2, help="Tokens per caption (hf towers).")
    ] = 77,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", min=8, help="Input size (default: the image tower's)."),
    ] = None,
    mean: Annotated[str | None, _per_channel("mean")] = None,
    std: Annotated[str | None, _per_channel("std")] = None,
    interpolation: Annotated[
        str | None,
        typer.Option(
            "--interpolation", help="bicubic, bilinear or nearest (default: the tower's)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the fresh projections.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
    as_json: Json = False,
    debug: Debug = False,
):
    """Join a pretrained image tower and a pretrained text tower with fresh projections into one
    model (an open_clip model directory); align them with `mmsearch finetune --method head`,
    then `--method lock-image`."""
    from ..finetune.compose import Preprocess
    from ..finetune.compose import compose as build

    prep = Preprocess(image_size, _floats(mean), _floats(std), interpolation)
    result = build(image, text, dim, out, context_length, prep, seed, overwrite)
    if as_json:
        emit_json(result.to_dict())
        return
    for note in result.notes:
        say(note)
    p = result.preprocess_cfg
    say(
        f"wrote {result.out}: {dim}-d space, fresh projections; images {p['size'][0]}x"
        f"{p['size'][1]} {p['interpolation']}, mean {p['mean']}, std {p['std']}"
    )
    say(f"align it: mmsearch finetune PAIRS --model {result.out} --method head --out ALIGNED")
