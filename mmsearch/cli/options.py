"""The option types every command shares (index, index root, --json, --debug, --device),
and the enums for --type and --index-type."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated

import typer

from ..modalities import MODALITIES


class IndexType(str, enum.Enum):
    auto = "auto"
    flat = "flat"
    ivf = "ivf"


# --type: the modalities of modalities.TABLE, or any.
Modality = enum.Enum("Modality", [(m, m) for m in (*MODALITIES, "any")], type=str)
TYPE_HELP = f"What to find: {', '.join(MODALITIES)} or any."


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(value: str | None) -> str | None:
    if value is not None and not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return value


IndexName = Annotated[str, typer.Option("--index", "-i", help="Index name.")]
IndexDir = Annotated[
    Path | None,
    typer.Option(
        "--index-dir",
        help="Index root. Default: $MMSEARCH_HOME, else the nearest indexes/ folder upward from "
        "here that holds an index, else the per-user data folder (~/.local/share/mmsearch/"
        "indexes on Linux). `mmsearch list` says which.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON lines).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
Device = Annotated[
    str,
    typer.Option("--device", callback=check_device, help="auto, cpu, cuda, cuda:N or mps."),
]
