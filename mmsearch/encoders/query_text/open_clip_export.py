"""Export an open_clip model's text tower, whichever kind it is: CLIP's own transformer
(`export.export_fast_text`) or a Hugging Face encoder (`hf_export.export_hf_text_tower`, with the
parts read from open_clip's HFTextEncoder and HFTokenizer). torch is imported inside functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .export import export_fast_text
from .hf_export import export_hf_text_tower
from .torch_parts import open_clip_reference


def export_open_clip_text(model, tokenizer, out_dir: Path) -> bool:
    """Export an open_clip model's text tower, whichever kind it is: `export_open_clip_hf` for a
    Hugging Face text tower, `export.export_fast_text` for CLIP's own transformer."""
    if is_hf_text_tower(model):
        return export_open_clip_hf(model, tokenizer, out_dir)
    return export_fast_text(model, tokenizer, out_dir)


def is_hf_text_tower(model) -> bool:
    text = getattr(model, "text", None)
    return text is not None and all(hasattr(text, a) for a in ("transformer", "pooler", "proj"))


def export_open_clip_hf(model, tokenizer, out_dir: Path) -> bool:
    """`export_hf_text_tower` for an open_clip model whose text tower is an HFTextEncoder, checked
    against `model.encode_text(tokenizer(texts))` itself."""
    parts, _ = open_clip_hf_parts(model, tokenizer)
    if parts is None:
        shutil.rmtree(out_dir, ignore_errors=True)
        return False

    reference_tokens, reference_embed = open_clip_reference(model, tokenizer)
    return export_hf_text_tower(
        **parts,
        out_dir=out_dir,
        reference_tokens=reference_tokens,
        reference_embed=reference_embed,
    )


_OPEN_CLIP_POOLERS = {
    "MeanPooler": "mean",
    "ClsPooler": "cls",
    "ClsLastHiddenStatePooler": "cls",
}


def open_clip_hf_parts(model, tokenizer) -> tuple[dict | None, str | None]:
    """The keyword arguments of `export_hf_text_tower` for an open_clip model with an
    HFTextEncoder text tower and its HFTokenizer, or (None, why not)."""
    if not is_hf_text_tower(model):
        return None, "text tower is not open_clip's HFTextEncoder"
    text = model.text
    if getattr(text, "output_tokens", False):
        return None, "text tower outputs tokens"
    pooling = _OPEN_CLIP_POOLERS.get(type(text.pooler).__name__)
    if pooling is None:
        return None, f"text pooler {type(text.pooler).__name__} is not supported"
    if pooling == "cls" and getattr(text.pooler, "use_pooler_output", False):
        if getattr(text.transformer, "pooler", None) is not None:
            pooling = "cls_pooler"
    clean = {
        "_clean_lower": "lower",
        "_clean_whitespace": "whitespace",
        "_clean_canonicalize": "canonicalize",
    }.get(getattr(getattr(tokenizer, "clean_fn", None), "__name__", ""))
    hf_tok = getattr(tokenizer, "tokenizer", None)
    if (
        clean is None
        or hf_tok is None
        or getattr(tokenizer, "tokenizer_mode", "") not in ("", None)
    ):
        return None, "tokenizer is not open_clip's HFTokenizer in its standard mode"
    return {
        "hf_model": text.transformer,
        "tokenizer": hf_tok,
        "pooling": pooling,
        "projection": text.proj,
        "context_length": int(tokenizer.context_length),
        "clean": clean,
        "strip_sep_token": bool(getattr(tokenizer, "strip_sep_token", False)),
    }, None
