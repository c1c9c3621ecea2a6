"""Symmetric InfoNCE (CLIP's contrastive loss) as a pure function of embeddings.

One loss for every contrastive fit: image/text fine-tuning (`finetune.optim`), audio fine-tuning
(`finetune.audio`) and the audio projector's refinement (`encoders.clap.projector`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    scale: torch.Tensor | float | None = None,
    temperature: float | None = None,
    groups: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean of the a->b and b->a cross-entropies over one batch of L2-normalised embeddings.

    Row i of `a` and row i of `b` are a positive pair. The cosines are multiplied by `scale` (the
    exp of a learnable logit scale) or divided by `temperature`; give exactly one. `groups` is one
    id per row, or several such id vectors: rows that share an id in any of them (captions of one
    file, one caption of several files) are not treated as each other's negatives.
    """
    if (scale is None) == (temperature is None):
        raise ValueError("give exactly one of scale and temperature")
    logits = scale * a @ b.T if temperature is None else a @ b.T / temperature
    if groups is not None:
        ids = [groups] if isinstance(groups, torch.Tensor) else list(groups)
        same = ids[0][:, None] == ids[0][None, :]
        for more in ids[1:]:
            same = same | (more[:, None] == more[None, :])
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: torch.Tensor | float,
    groups: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """`info_nce` of features that need not be normalised: they are cast to fp32 and normalised."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    return info_nce(image, text, scale=scale, groups=groups)
