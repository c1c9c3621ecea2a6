"""The torch side shared by the exporters (`export` for open_clip's CLIP text tower, `hf_export`
for Hugging Face encoders): reading layers into numpy, checking a written copy against its torch
original, and publishing it only when it agrees. torch is imported inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..base import Tower, l2_normalize

# Activation modules by class name: torch's, open_clip's and transformers' (ACT2FN). Anything
# else is unsupported; a name that computes something else is caught by the verification.
_ACTIVATIONS = {
    "GELUActivation": "gelu",  # transformers "gelu": exact erf (torch or its python version)
    "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "QuickGELU": "quick_gelu",
    "QuickGELUActivation": "quick_gelu",
    "ReLU": "relu",
    "Tanh": "tanh",
    "Identity": "identity",
}


def act_name(act) -> str | None:
    """The numpy_ops.ACTIVATIONS name computing this activation module, or None."""
    import torch

    if type(act) is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return _ACTIVATIONS.get(type(act).__name__)


def layer_norm_params(ln, width: int):
    """(weight, bias, eps) of a LayerNorm over `width` features with a weight, or None."""
    import torch

    if not isinstance(ln, torch.nn.LayerNorm) or tuple(ln.normalized_shape) != (width,):
        return None
    if ln.weight is None:
        return None
    bias = ln.bias if ln.bias is not None else torch.zeros(width)
    return ln.weight, bias, float(ln.eps)


def f32(t) -> np.ndarray:
    import torch

    return t.detach().to("cpu", torch.float32).numpy().copy()


def open_clip_reference(model, tokenizer) -> tuple[Callable, Callable]:
    """(texts -> padded token ids, texts -> embeddings) of an open_clip model and its tokenizer:
    what an export is checked against."""
    import torch

    def reference_tokens(texts):
        return tokenizer(texts).cpu().numpy()

    def reference_embed(texts):
        device = next(model.parameters()).device
        with torch.inference_mode():
            return model.encode_text(tokenizer(texts).to(device)).float().cpu().numpy()

    return reference_tokens, reference_embed


def agrees(
    tower: Tower,
    texts: Sequence[str],
    embed_texts: Sequence[str],
    reference_tokens: Callable[[list[str]], np.ndarray],
    reference_embed: Callable[[list[str]], np.ndarray],
) -> bool:
    """The copy tokenizes `texts` exactly as `reference_tokens` does, and its normalised
    embeddings of `embed_texts` (as a batch and one at a time) are within 1e-4 of
    `reference_embed`'s (normalised here)."""
    if not np.array_equal(np.asarray(reference_tokens(list(texts))), tower.tokenizer(texts)):
        return False
    texts = list(embed_texts)
    ref = l2_normalize(np.asarray(reference_embed(texts), dtype=np.float32))
    got = l2_normalize(tower.embed_batch(texts))
    # One at a time too: a single query (no padding in the batch) is the common case.
    one = l2_normalize(np.concatenate([tower.embed_batch([t]) for t in texts[:-1]]))
    return (
        got.shape == ref.shape
        and bool(np.isfinite(got).all())
        and float(np.abs(got - ref).max()) <= 1e-4
        and float(np.abs(one - ref[:-1]).max()) <= 1e-4
    )


def publish(
    out_dir: Path,
    config: dict,
    arrays: dict[str, np.ndarray],
    files: dict[str, str],
    verify: Callable[[Path], bool],
) -> bool:
    """Write config.json, one .npy per array and the text `files` to a temp dir beside out_dir,
    run `verify` on it, and rename it into place if it passes. Returns False if it does not (or
    raises); out_dir then does not exist, so a stale earlier export is never used."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        try:
            ok = verify(tmp)
        except Exception:  # an export that cannot even run the samples is a failed export
            ok = False
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            return False
        # A directory cannot be atomically replaced by rename, so move the old one aside first.
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
