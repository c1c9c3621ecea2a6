"""Fine-tune the shared space on a user's own (file, caption) pairs, and measure retrieval on them.

    pairs = read_pairs("pairs.csv")
    result = finetune(pairs, FinetuneConfig(model="ViT-B-32", out=Path("models/mine"), method="lora"))
    evaluate(pairs, "models/mine")

Names load on first use, so `read_pairs` and `recall_at_k` do not import torch.
"""

from __future__ import annotations

import importlib

# torch-free modules load now (this also keeps the name `evaluate` bound to the function, not to
# the submodule of the same name); the torch-backed ones on first use.
from .evaluate import KS, Recall, evaluate, recall_at_k
from .pairs import Pair, PairSet, Skipped, read_pairs

_EXPORTS = {
    "DEFAULT_LORA_TARGETS": "config", "DEFAULT_LR": "config", "METHODS": "config",
    "FinetuneConfig": "config", "FinetuneResult": "config", "finetune": "train",
}  # fmt: skip
__all__ = [
    "DEFAULT_LORA_TARGETS", "DEFAULT_LR", "KS", "METHODS", "FinetuneConfig", "FinetuneResult",
    "Pair", "PairSet", "Recall", "Skipped", "evaluate", "finetune", "read_pairs", "recall_at_k",
]  # fmt: skip


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
