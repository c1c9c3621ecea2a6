"""What `finetune` and `eval` share: the pairs arguments and the rendering of recall tables and
of the pairs left out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import say

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

FeatureCacheDir = Annotated[
    Path | None,
    typer.Option(
        "--feature-cache",
        help="Folder where features of frozen tower parts are kept between runs and "
        "evaluations (default: INDEX_ROOT/.models/features, at most 4 GiB, safe to delete).",
        show_default=False,
    ),
]
NoFeatureCache = Annotated[
    bool, typer.Option("--no-feature-cache", help="Compute frozen features afresh; keep none.")
]

CaptionsFrom = Annotated[
    str,
    typer.Option(
        "--captions-from",
        help="For a folder: where captions come from, any of sidecar (a.jpg + a.txt), xmp "
        "(descriptions, titles and keywords embedded in photos as XMP or IPTC), folders (the "
        "folder's name); every distinct caption found is a pair.",
    ),
]


def caption_sources(text: str) -> tuple[str, ...]:
    from ..finetune.captions import parse_sources

    try:
        return parse_sources(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--captions-from") from None


def feature_cache_dir(folder: Path | None, off: bool) -> Path | None:
    from ..finetune.features import default_dir

    return None if off else (folder or default_dir())


def pairs_notes(pairs) -> str | None:
    """The files a pairs file pulled in from outside its folder, for stderr."""
    if not pairs.outside:
        return None
    shown = ", ".join(str(p) for p in pairs.outside[:3])
    more = f" and {len(pairs.outside) - 3} more" if len(pairs.outside) > 3 else ""
    return f"read {len(pairs.outside)} files from outside the pairs file's folder: {shown}{more}"


def skipped_line(counts: dict) -> str:
    from ..finetune.pairs import OUTSIDE

    line = "skipped pairs: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return line + (" (--allow-outside reads them)" if OUTSIDE in counts else "")


def say_skipped_audio(skipped: dict) -> None:
    if skipped:
        say("skipped audio files: " + ", ".join(f"{v} {k}" for k, v in skipped.items()), err=True)


def recall_table(*recalls, names: list[str] | None = None, audio: bool = False) -> str:
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
