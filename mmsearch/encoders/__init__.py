"""Encoder factory: a model spec in, an Encoder (towers in one vector space) out."""

from __future__ import annotations

from pathlib import Path

from ..config import DEFAULT_MODEL, EncoderOptions, ModelSpec
from .base import Encoder, EncoderIdentity, Tower, l2_normalize

__all__ = [
    "Encoder",
    "EncoderIdentity",
    "Tower",
    "attach_audio",
    "create_encoder",
    "l2_normalize",
    "query_text_tower",
]


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
    """Write the torch-free text tower searches use (open_clip's CLIP text transformer or a
    Hugging Face encoder); False when the architecture is unsupported or the copy disagrees."""
    target = Path(cache_dir) / "text"
    if (target / "config.json").is_file():
        return True
    from .query_text.open_clip_export import export_open_clip_text

    model, tokenizer = encoder.model, encoder.tokenizer
    if next(model.parameters()).dtype != _float32() or encoder.device != "cpu":
        # the export copies weights as they were published: reload them in fp32 on the CPU
        fp32 = create_encoder(encoder.identity.spec, EncoderOptions(device="cpu", precision="fp32"))
        model, tokenizer = fp32.model, fp32.tokenizer
    return export_open_clip_text(model, tokenizer, target)


def _float32():
    import torch

    return torch.float32


def query_text_tower(cache_dir: Path) -> Tower | None:
    """The torch-free text tower exported for this model, or None if there is none."""
    target = Path(cache_dir) / "text"
    if not (target / "config.json").is_file():
        return None
    from .query_text import load_fast_text

    return load_fast_text(target)


def attach_audio(
    encoder: Encoder,
    audio_model: str | None,
    cache_dir: Path,
    projector=None,
    refit: bool = False,
    progress=None,
) -> Encoder:
    """Give `encoder` an audio tower: CLAP's audio encoder projected into its space.

    The projector is `projector` if given (a file or a `clap.Projector`), else the one fitted
    for this (CLIP, CLAP) pair and cached in `cache_dir` (fitted on first use, or again with
    `refit`).
    """
    from .clap import load_audio_tower

    tower = load_audio_tower(
        audio_model,
        encoder,
        cache_dir,
        device=encoder.device,
        refit=refit,
        progress=progress,
        projector=projector,
    )
    encoder.audio = tower
    encoder.audio_windows = tower.loader_settings()
    return encoder
