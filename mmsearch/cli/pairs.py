"""What `finetune` and `eval` share: the pairs argument, the options that say how pairs are read
(`PairsReading`), and the rendering of recall tables and of the pairs left out."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PairsReading:
    """How a command reads pairs and caches frozen features: its options --allow-outside,
    --captions-from, --feature-cache and --no-feature-cache (the defaults are theirs)."""

    allow_outside: AllowOutside = False
    captions_from: CaptionsFrom = "sidecar"
    feature_cache: FeatureCacheDir = None
    no_feature_cache: NoFeatureCache = False

    def read(self, source: Path, captions: bool = True):
        """The pairs of `source` (a PairSet); `captions=False` reads a file's captions only, not
        those a folder's files carry (--captions-from)."""
        from ..finetune import read_pairs

        if not captions:
            return read_pairs(source, allow_outside=self.allow_outside)
        sources = caption_sources(self.captions_from)
        return read_pairs(source, allow_outside=self.allow_outside, captions_from=sources)

    def cache_dir(self) -> Path | None:
        """Where frozen features are kept (None: nowhere)."""
        from ..finetune.features import default_dir

        return None if self.no_feature_cache else (self.feature_cache or default_dir())

    @staticmethod
    def options(fn):
        """Decorate a command with a parameter `reading: PairsReading = PairsReading()`: in its
        place the command gains the four options, and receives them as one PairsReading."""
        fields = dataclasses.fields(PairsReading)
        hints = typing.get_type_hints(PairsReading, include_extras=True)
        sig = inspect.signature(fn, eval_str=True)
        params = []
        for p in sig.parameters.values():
            if p.name != "reading":
                params.append(p)
                continue
            for f in fields:
                params.append(p.replace(name=f.name, annotation=hints[f.name], default=f.default))

        @functools.wraps(fn)
        def command(*args, **kwargs):
            reading = PairsReading(**{f.name: kwargs.pop(f.name) for f in fields})
            return fn(*args, reading=reading, **kwargs)

        command.__signature__ = sig.replace(parameters=params)
        return command


def caption_sources(text: str) -> tuple[str, ...]:
    from ..finetune.captions import parse_sources

    try:
        return parse_sources(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--captions-from") from None


def say_pairs_notes(pairs) -> None:
    """Say on stderr which files a pairs file pulled in from outside its folder."""
    if not pairs.outside:
        return
    n = len(pairs.outside)
    shown = ", ".join(str(p) for p in pairs.outside[:3])
    more = f" and {n - 3} more" if n > 3 else ""
    say(f"read {n} files from outside the pairs file's folder: {shown}{more}", err=True)


def say_skipped(counts: dict, audio: bool = False) -> None:
    """Say on stderr what was left out, by reason: pairs, or (`audio`) audio files."""
    if not counts:
        return
    from ..finetune.pairs import OUTSIDE

    line = ", ".join(f"{v} {k}" for k, v in counts.items())
    if audio:
        say(f"skipped audio files: {line}", err=True)
        return
    hint = " (--allow-outside reads them)" if OUTSIDE in counts else ""
    say(f"skipped pairs: {line}{hint}", err=True)


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
