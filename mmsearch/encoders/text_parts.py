"""Where a text tower splits into its trunk (embeddings, transformer, final norm, pooling) and its
output projection, read in one place for two callers:

- `query_text.export` copies open_clip's CLIP text tower (`clip_text_tower`) into numpy;
- fine-tuning (`finetune.encode`) runs a frozen trunk once per caption instead of every step, and
  cuts each batch to its longest text (`split_text_tower`, `encode_text`).

Both rely on the same property: a tower that pools at the argmax token (EOT) behind a causal mask
ignores every position after it. torch and open_clip are imported inside the functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


def clip_text_tower(model) -> tuple[Any, str | None]:
    """(the module holding open_clip's text transformer, None): the model itself for CLIP, its
    `text` for a CustomTextCLIP with a TextTransformer. Only towers that pool at the argmax token
    behind a causal mask, with no class token or padding mask; else (None, why not)."""
    import torch
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):
        src, pool_type, cls_emb, pad_mask = model, model.text_pool_type, None, False
    elif isinstance(model, CustomTextCLIP):
        src = model.text
        if not isinstance(src, TextTransformer):
            return None, f"text tower is {type(src).__name__}, not open_clip's TextTransformer"
        pool_type, cls_emb = src.pool_type, src.cls_emb
        pad_mask = getattr(src, "use_pad_mask", False)
    else:
        return None, f"{type(model).__name__} is not an open_clip CLIP model"
    if pool_type != "argmax":
        return None, f"text pooling {pool_type!r} (only 'argmax' is supported)"
    if cls_emb is not None or pad_mask:
        return None, "text tower with a class token or padding mask"
    mask = getattr(src, "attn_mask", None)
    if not isinstance(mask, torch.Tensor):
        return None, "text tower without a causal attention mask"
    n_pos = mask.shape[0]
    causal = torch.full((n_pos, n_pos), float("-inf")).triu_(1)
    if mask.shape != causal.shape or not torch.equal(mask.float().cpu(), causal):
        return None, "text attention mask is not causal"
    if not isinstance(src.token_embedding, torch.nn.Embedding):
        return None, "token embedding is not an nn.Embedding"
    return src, None


class TextSplit(NamedTuple):
    """A text tower cut at its output projection: `project(pooled(tokens))` is its forward."""

    pooled: Callable  # tokens -> pooled features, the batch cut to its longest text
    project: Callable  # pooled features -> the tower's output
    trunk: list  # what `pooled` runs (modules, a bare parameter): for freezing checks and hashing
    pad_id: int


def split_text_tower(model) -> TextSplit | None:
    """The split of open_clip's CLIP text tower (`clip_text_tower`) or of a Hugging Face tower
    (padding-masked, so padding cannot change its result either); None for other towers."""
    text = getattr(model, "text", None)
    if text is not None and all(
        hasattr(text, a) for a in ("transformer", "pooler", "proj", "config")
    ):
        return _hf_split(text)
    src, _ = clip_text_tower(model)
    return _clip_split(src) if src is not None else None


def encode_text(model, tokens):
    """`model.encode_text`, through `split_text_tower` where the tower allows (same result,
    faster)."""
    parts = split_text_tower(model)
    if parts is None:
        return model.encode_text(tokens)
    return parts.project(parts.pooled(tokens))


def _hf_split(text) -> TextSplit | None:
    pad = text.config.pad_token_id
    if pad is None:
        return None

    def pooled(tokens):  # HFTextEncoder.forward up to its projection
        tokens = tokens[:, : _used_columns(tokens, pad)]
        mask = (tokens != pad).long()
        return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)

    return TextSplit(pooled, text.proj, [text.transformer], pad)


def _clip_split(src) -> TextSplit:
    # The parts are read from `src` at each call: fine-tuning methods parametrize them in place.
    import torch

    def pooled(tokens):  # CLIP.encode_text / TextTransformer.forward up to the projection
        n = _used_columns(tokens, 0)
        tokens = tokens[:, :n]
        cast = src.transformer.get_cast_dtype()
        x = src.token_embedding(tokens).to(cast) + src.positional_embedding[:n].to(cast)
        x = src.transformer(x, attn_mask=src.attn_mask[:n, :n])
        x = src.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]

    def project(x):
        proj = src.text_projection
        if isinstance(proj, torch.nn.Linear):
            return proj(x)
        return x @ proj if proj is not None else x

    trunk = [src.token_embedding, src.transformer, src.ln_final]
    return TextSplit(pooled, project, [*trunk, _ParamHolder(src.positional_embedding)], 0)


class _ParamHolder:
    """Lets a bare parameter sit in a list of modules for freezing checks and hashing."""

    def __init__(self, p):
        self.p = p

    def parameters(self):
        return iter([self.p])

    def state_dict(self):
        return {"p": self.p}


def _used_columns(tokens, pad_id: int) -> int:
    used = (tokens != pad_id).any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 1
