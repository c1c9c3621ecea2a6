"""`mmsearch clip`: cut a moment a search found out of its video or recording."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from .app import app, clock, emit_json, handle_errors, say, shown
from .options import Debug, Json

_TIME = re.compile(r"(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?|\.\d+)")


def parse_time(value: str, what: str) -> float:
    """Seconds, as `12.5` or as search shows them: `0:12.5`, `1:02:03`."""
    from ..errors import UsageError

    m = _TIME.fullmatch(value.strip())
    if m is None:
        raise UsageError(f"--{what} {value!r} is not a time; use seconds (12.5) or m:ss (0:12.5)")
    hours, minutes, seconds = m.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


@app.command()
@handle_errors
def clip(
    path: Annotated[
        Path,
        typer.Argument(help="The video or recording of a hit.", show_default=False, metavar="PATH"),
    ],
    start: Annotated[
        str,
        typer.Option(
            "--start", "-s", help="Where the moment starts: seconds or m:ss.", metavar="TIME"
        ),
    ],
    end: Annotated[
        str, typer.Option("--end", "-e", help="Where it ends: seconds or m:ss.", metavar="TIME")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="FILE",
            help="The file to write; its extension picks the format (.mp4, .webm, .wav, ...).",
            show_default=False,
        ),
    ],
    copy: Annotated[
        bool | None,
        typer.Option(
            "--copy/--reencode",
            help="Copy the streams as they are (fails where the format cannot), or always "
            "re-encode. Default: copy where the output can hold the streams and a keyframe lies "
            "within a second before the start, else re-encode.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Replace an existing --out.")
    ] = False,
    as_json: Json = False,
    debug: Debug = False,
):
    """Cut seconds START to END of a video or recording into a file of its own (the times a
    search hit shows)."""
    from ..errors import UsageError
    from ..loaders.cut import cut_clip

    a, b = parse_time(start, "start"), parse_time(end, "end")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    cut = cut_clip(path, a, b, out, copy=copy)
    how = "copied" if cut.copied else "re-encoded"
    if as_json:
        emit_json(
            {"out": str(out), "source": str(path), "start": round(cut.start, 3),
             "end": round(cut.end, 3), "copied": cut.copied}
        )  # fmt: skip
    else:
        span = f"[{clock(cut.start)}-{clock(cut.end)}]"
        say(f"wrote {shown(str(out))}: {span} of {shown(str(path))} ({how})")
