"""Encoder factory: a model spec in, an Encoder (towers in one vector space) out."""

from __future__ import annotations

from pathlib import Path

from ..config import DEFAULT_MODEL, EncoderOptions, ModelSpec
from .base import Encoder, Tower, l2_normalize

__all__ = ["Encoder", "Tower", "create_encoder", "l2_normalize", "query_text_tower"]


def create_encoder(
    spec: ModelSpec | str | None = None, options: EncoderOptions | None = None
) -> Encoder:
    """Load the open_clip towers for `spec` (default ViT-B-32 laion2b_s34b_b79k)."""
    from .clip import load_clip

    if spec is None:
        spec = DEFAULT_MODEL
    if isinstance(spec, str):
        spec = ModelSpec.parse(spec)
    return load_clip(spec, options or EncoderOptions())


def export_query_tower(encoder: Encoder, cache_dir: Path) -> bool:
    """Write the torch-free text tower searches use; False when the architecture is unsupported."""
    target = Path(cache_dir) / "text"
    if (target / "config.json").is_file():
        return True
    try:
        from .fast_text import export_fast_text
    except ImportError:
        return False
    return export_fast_text(encoder.extras["model"], encoder.extras["tokenizer"], target)


def query_text_tower(cache_dir: Path) -> Tower | None:
    """The torch-free text tower exported for this model, or None if there is none."""
    target = Path(cache_dir) / "text"
    if not (target / "config.json").is_file():
        return None
    try:
        from .fast_text import FastTextTower
    except ImportError:
        return None
    return FastTextTower.load(target)
