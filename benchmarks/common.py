"""Shared benchmark helpers: the datasets folder and a random-weight ViT-B-32 in local-dir layout."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
OUT = Path(__file__).resolve().parent / "out"


def machine() -> str:
    import os

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"


def random_model_dir(arch: str = "ViT-B-32", seed: int = 0) -> Path:
    """open_clip `arch` with random weights, written once in local-dir layout and reused."""
    out = OUT / f"{arch}-random-{seed}"
    if (out / "open_clip_model.safetensors").is_file():
        return out
    import open_clip
    import torch
    from open_clip.factory import get_model_config

    from mmsearch.encoders.clip import save_model_dir

    torch.manual_seed(seed)
    cfg = get_model_config(arch)
    model = open_clip.create_model(arch)
    save_model_dir(model, json.loads(json.dumps(cfg)), out)
    return out


def require_datasets() -> None:
    if not DATASETS.is_dir():
        raise SystemExit(f"datasets not found at {DATASETS} (see ../shared/datasets/README.md)")
