"""Symmetric InfoNCE (CLIP's contrastive loss) as a pure function of embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: torch.Tensor | float,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over one batch.

    Row i of each side is a positive pair. `scale` multiplies the cosine similarities (the exp of
    the model's learnable `logit_scale`). `groups` (one id per row, e.g. the file index) marks rows
    that share a file: captions of the same image are not treated as negatives of each other.
    Features need not be normalised; they are normalised here.
    """
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = scale * image @ text.T
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
