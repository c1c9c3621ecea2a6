"""What each fine-tuning method trains, and how its adapters fold back into plain open_clip weights.

Adapters are torch parametrizations of existing weights (`W -> W + delta`), so the model's own
forward code runs unchanged (nn.MultiheadAttention's fused `in_proj_weight` included) and merging
is just evaluating the parametrization once. The merged state dict has exactly the base model's
keys, so the saved model loads in plain open_clip.

- head: a residual linear adapter on each tower's output projection, `x -> x + x @ D` applied to
  the projection's input (D starts at zero), folded into `visual.proj` / `text_projection` (or the
  tower's last projection Linear for timm / Hugging Face towers).
- lora: `W -> W + (alpha / rank) * B @ A` on the attention and MLP linears named by `targets`.
- lock-image: the image tower is frozen (timm towers keep their projection head trainable, as in
  open_clip's `lock_image_tower`) but its last `unlocked_image_layers` layer groups; the text
  tower trains, all of it or its last `unlocked_text_layers` blocks (plus final norm and
  projection).
- full: everything trains.
The learnable temperature (`logit_scale`) trains in every method.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UsageError
from .config import DEFAULT_LORA_TARGETS, METHODS


class ResidualAdapter(nn.Module):
    """Parametrizes a projection so its input passes through `x + x @ delta` first."""

    def __init__(self, dim: int, layout: str):
        super().__init__()
        self.layout = layout  # "matmul": y = x @ W, W is (in, out); "linear": W is (out, in)
        self.delta = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        d = self.delta.to(w.dtype)
        return w + d @ w if self.layout == "matmul" else w + w @ d.T


class LowRankDelta(nn.Module):
    """Parametrizes a (out, in) weight as `W + scale * B @ A` (LoRA; B starts at zero)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear and peft initialise A
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.B @ self.A).to(w.dtype) * self.scale


def apply_method(
    model: nn.Module,
    method: str,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    unlocked_text_layers: int | None = None,
    unlocked_image_layers: int = 0,
) -> list[str]:
    """Freeze and adapt `model` in place for `method`; returns the names of what was adapted."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model.requires_grad_(method == "full")
    adapted: list[str] = []
    if method == "head":
        for name, owner, attr, layout in output_projections(model):
            w = getattr(owner, attr)
            dim = w.shape[0] if layout == "matmul" else w.shape[1]
            parametrize.register_parametrization(owner, attr, ResidualAdapter(dim, layout))
            adapted.append(name)
    elif method == "lora":
        if lora_rank < 1:
            raise UsageError("--lora-rank must be at least 1")
        alpha = float(lora_alpha if lora_alpha is not None else 2 * lora_rank)
        for name, owner, attr in lora_sites(model, lora_targets):
            out_f, in_f = getattr(owner, attr).shape
            delta = LowRankDelta(out_f, in_f, min(lora_rank, out_f, in_f), alpha)
            parametrize.register_parametrization(owner, attr, delta)
            adapted.append(name)
        if not adapted:
            raise UsageError(
                f"--lora-targets {', '.join(lora_targets)} match no linear layer of this model"
            )
    elif method == "lock-image":
        model.requires_grad_(True)
        if not hasattr(model, "lock_image_tower"):
            raise UsageError("this model has no image tower to lock")
        model.lock_image_tower(unlocked_groups=unlocked_image_layers)
        if unlocked_image_layers:
            adapted.append(f"image tower: last {unlocked_image_layers} layer groups")
        if unlocked_text_layers is not None:
            adapted.append(lock_text_bottom(model, unlocked_text_layers))
        else:
            adapted.append("text tower")
    else:
        adapted.append("all weights")
    logit_scale = getattr(model, "logit_scale", None)
    if isinstance(logit_scale, nn.Parameter):
        logit_scale.requires_grad_(True)
    return adapted


def lock_text_bottom(model: nn.Module, keep: int) -> str:
    """Freeze the text tower but its last `keep` blocks, its final norm and its projection."""
    text = model.text if hasattr(model, "text") else model
    hf_config = getattr(text, "config", None)
    if hf_config is not None and hasattr(text, "transformer"):  # Hugging Face tower
        # the block stack: the longest ModuleList (encoder.layer in BERT, block in T5, ...)
        stacks = [m for m in text.transformer.modules() if isinstance(m, nn.ModuleList)]
        blocks = max(stacks, key=len) if stacks else []
        text.transformer.requires_grad_(False)
        name = "text.transformer"
    elif hasattr(getattr(text, "transformer", None), "resblocks"):  # open_clip text transformer
        blocks = text.transformer.resblocks
        for part in ("token_embedding", "positional_embedding", "cls_emb", "transformer"):
            p = getattr(text, part, None)
            if p is not None:
                p.requires_grad_(False)
        name = "text blocks" if text is model else "text.transformer.resblocks"
    else:
        raise UsageError("--unlocked-text-layers: this text tower has no blocks to count")
    if not 0 <= keep <= len(blocks):
        raise UsageError(f"--unlocked-text-layers must be between 0 and {len(blocks)}")
    for block in list(blocks)[len(blocks) - keep :]:
        block.requires_grad_(True)
    return f"{name}: last {keep} of {len(blocks)} blocks, final norm and projection"


def output_projections(model: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """(name, owner module, attribute, layout) of each tower's final projection weight."""
    found = []
    visual = model.visual
    if _matrix(getattr(visual, "proj", None)):  # open_clip VisionTransformer
        found.append(("visual.proj", visual, "proj", "matmul"))
    elif hasattr(visual, "attnpool"):  # ModifiedResNet
        found.append(("visual.attnpool.c_proj", visual.attnpool.c_proj, "weight", "linear"))
    elif hasattr(visual, "head") and _last_linear(visual.head) is not None:  # timm tower
        name, lin = _last_linear(visual.head)
        found.append((f"visual.head.{name}", lin, "weight", "linear"))
    elif hasattr(visual, "trunk") and isinstance(visual.trunk.get_classifier(), nn.Linear):
        found.append(("visual.trunk classifier", visual.trunk.get_classifier(), "weight", "linear"))
    else:
        raise UsageError("method 'head' cannot find the image tower's output projection")
    text_owner = model.text if hasattr(model, "text") else model
    proj = getattr(text_owner, "text_projection", None)
    prefix = "text." if text_owner is not model else ""
    if _matrix(proj):
        found.append((f"{prefix}text_projection", text_owner, "text_projection", "matmul"))
    elif isinstance(proj, nn.Linear):
        found.append((f"{prefix}text_projection", proj, "weight", "linear"))
    elif hasattr(text_owner, "proj") and _last_linear(text_owner.proj) is not None:  # HF tower
        name, lin = _last_linear(text_owner.proj)
        found.append((f"text.proj{'.' + name if name else ''}", lin, "weight", "linear"))
    else:
        raise UsageError(
            "method 'head' cannot find the text tower's output projection (a Hugging Face tower "
            "whose width equals the embedding size has none); use --method lora or lock-image"
        )
    return found


def lora_sites(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(name, owner, attribute) of each 2-D weight whose module matches a target.

    A target matches a module's last name component ("c_fc") or its full name as a glob
    ("visual.*.c_fc"). `in_proj` addresses nn.MultiheadAttention's fused q/k/v weight.
    """

    def hit(full: str) -> bool:
        last = full.rsplit(".", 1)[-1]
        return any(t == last or fnmatch.fnmatchcase(full, t) for t in targets)

    sites = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            if m._qkv_same_embed_dim and hit(f"{name}.in_proj" if name else "in_proj"):
                sites.append((f"{name}.in_proj_weight", m, "in_proj_weight"))
            elif not m._qkv_same_embed_dim and hit(f"{name}.in_proj" if name else "in_proj"):
                for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    sites.append((f"{name}.{attr}", m, attr))
        elif isinstance(m, nn.Linear) and hit(name):
            sites.append((f"{name}.weight", m, "weight"))
    return sites


def set_train_mode(model: nn.Module) -> None:
    """Train mode where something trains; fully frozen submodules stay in eval mode so their
    BatchNorm statistics and dropout do not change the frozen part."""
    model.train()
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint needs to restore training: trainable weights plus the persistent buffers
    (BatchNorm statistics) of modules that train; the frozen rest is rebuilt from the base."""
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keep = {k: v for k, v in state.items() if k in trainable}
    for mod_name, mod in model.named_modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            for b_name, _ in mod.named_buffers(recurse=False):
                key = f"{mod_name}.{b_name}" if mod_name else b_name
                if key in state:
                    keep[key] = state[key]
    return keep


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter folded in, under the base model's own keys."""
    state = {k: v for k, v in model.state_dict().items() if "parametrizations." not in k}
    for mod_name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for attr in mod.parametrizations:
                key = f"{mod_name}.{attr}" if mod_name else attr
                state[key] = getattr(mod, attr).detach()
    return state


def frozen_image_stage(model: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
    """(frozen prefix, trainable suffix) of the image tower when its start is frozen, so the
    prefix's output can be computed once per file instead of every step. None if nothing is."""
    visual = model.visual
    if not any(p.requires_grad for p in visual.parameters()):
        return visual, None
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if (
        trunk is not None
        and head is not None
        and not any(p.requires_grad for p in trunk.parameters())
    ):
        return trunk, head  # TimmModel.forward is head(trunk(x))
    return None


def _matrix(x) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 2


def _last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    if isinstance(module, nn.Linear):
        return "", module
    last = None
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    return last
