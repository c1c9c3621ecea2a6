"""Issue 14 items 3 and 6, measured with the LiT model's towers (/work/lit_model, HF_HUB_OFFLINE=1).

(a) Feature cache: the same `--method head` run twice on a slice of flickr8k_train2k with one
    cache folder; wall time of the first (cold: the frozen EfficientNet trunk and MiniLM trunk
    run) and the second (warm: read back), and how many features each computed.
(b) Forgetting: fine-tune the heads on digits_trimodal's MNIST images with digit words (2 epochs,
    as in the issue), once plainly and once with `--retain` pairs (a slice of flickr8k_train2k
    not used elsewhere here) choosing the WiSE-FT mix under max_forgetting 0.05; then digit
    recall (held-out MNIST files; a digit word is one query any image of that digit answers,
    `recall_shared_captions`) and flickr8k_val1k recall (a slice) for base, fine-tuned and mix.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/bench_finetune_keep.py --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import DATASETS, machine

LIT = Path("/work/lit_model")


def manifest_pairs(name: str, n_files: int, skip_files: int = 0, modality: str = "image"):
    """The first `n_files` image files (after `skip_files`) of a dataset with all their captions."""
    from mmsearch.finetune.pairs import Pair, PairSet

    root = DATASETS / name
    rows = [r for r in csv.DictReader(open(root / "manifest.csv", newline=""))
            if r["modality"] == modality]  # fmt: skip
    files = list(dict.fromkeys(r["path"] for r in rows))[skip_files : skip_files + n_files]
    keep = set(files)
    return PairSet([Pair(root / r["path"], r["text"], "image") for r in rows if r["path"] in keep])


def shared_recall(model: str, pairs, cache: Path):
    """Class-level recall: distinct captions, any image with the caption is a hit."""
    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders.clip import load_clip
    from mmsearch.finetune.evaluate import decode_images, recall_shared_captions
    from mmsearch.finetune.features import CachedEncoder

    enc = load_clip(ModelSpec.parse(model), EncoderOptions(device="cpu", precision="fp32"))
    cached = CachedEncoder(enc, cache, 64, decode_images)
    files, img, _ = cached.images(pairs.files())
    words = sorted({p.caption for p in pairs.pairs})
    txt = cached.texts(words)
    row = {f: i for i, f in enumerate(files)}
    relevant = [(words.index(p.caption), row[p.path]) for p in pairs.pairs if p.path in row]
    return recall_shared_captions(img, txt, relevant)


def fmt(r) -> str:
    t, i = r.text_to_image, r.image_to_text
    return " | ".join(f"{100 * v:.1f}" for v in (t[1], t[5], t[10], i[1], i[5], i[10], r.mean))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-files", type=int, default=300, help="flickr8k_train2k slice for (a)")
    ap.add_argument("--retain-files", type=int, default=200, help="flickr8k_train2k slice, (b)")
    ap.add_argument("--val-files", type=int, default=300, help="flickr8k_val1k slice for (b)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep-cache", action="store_true", help="start from WORK/cache as it is")
    ap.add_argument("--skip-a", action="store_true", help="only (b)")
    args = ap.parse_args()
    import torch

    from mmsearch.finetune import FinetuneConfig, evaluate, finetune
    from mmsearch.finetune.pairs import split_by_file

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_keep-"))
    if not args.keep_cache:
        shutil.rmtree(work / "cache", ignore_errors=True)
    cache = work / "cache"
    load = os.getloadavg()[0]
    print(f"{machine()}; torch threads {args.threads}; load average {load:.1f}", flush=True)
    common = dict(model=str(LIT), method="head", batch_size=128, lr=1e-3, weight_decay=0.0,
                  device="cpu", precision="fp32", seed=0, feature_cache=cache, plot=False,
                  overwrite=True)  # fmt: skip

    # (a) the same head run twice, cold then warm
    train = manifest_pairs("flickr8k_train2k", args.train_files)
    times = []
    for n in () if args.skip_a else (1, 2):
        t = time.perf_counter()
        r = finetune(train, FinetuneConfig(out=work / f"head{n}", epochs=1, **common))
        times.append(time.perf_counter() - t)
        print(f"  head run {n}: {times[-1]:.1f} s, features {json.dumps(r.feature_cache)}, "
              f"held-out mean recall {r.after.mean:.4f}", flush=True)  # fmt: skip
    if not args.skip_a:
        print(f"(a) {len(train.files())} files / {len(train)} pairs, 1 epoch: cold {times[0]:.1f} s, "
              f"warm {times[1]:.1f} s, ratio {times[0] / times[1]:.1f}x", flush=True)  # fmt: skip

    # (b) forgetting
    digits = manifest_pairs("digits_trimodal", 1000)
    retain = manifest_pairs("flickr8k_train2k", args.retain_files, skip_files=args.train_files)
    flickr_val = manifest_pairs("flickr8k_val1k", args.val_files)
    t = time.perf_counter()
    plain = finetune(digits, FinetuneConfig(out=work / "digits", epochs=2, **common))
    wise = finetune(digits, FinetuneConfig(out=work / "digits_wise", epochs=2, **common),
                    retain_pairs=retain)  # fmt: skip
    print(f"  two digit runs {time.perf_counter() - t:.1f} s; WiSE-FT alpha {wise.mix.alpha}",
          flush=True)  # fmt: skip
    for row in wise.mix.curve:
        print(f"    alpha {row['alpha']:.1f}: held-out digits mean "
              f"{row['target']['mean']:.4f}, retention mean {row['retention']['mean']:.4f}, "
              f"forgetting {row['forgetting']:.3f}")  # fmt: skip
    _, held = split_by_file(digits, 0.1, 0)  # the held-out digit files of both runs
    models = {"base": str(LIT), "fine-tuned": str(plain.out),
              f"WiSE-FT mix ({wise.mix.alpha:g})": str(wise.out)}  # fmt: skip
    out = {}
    print(
        "| model | digits t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 | mean || flickr val "
        "t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 | mean |"
    )
    for name, path in models.items():
        d = shared_recall(path, held, cache)
        f = evaluate(flickr_val, path, device="cpu", precision="fp32", feature_cache=cache)
        out[name] = (d, f)
        print(f"| {name} | {fmt(d)} || {fmt(f)} |", flush=True)
    (db, fb), (dft, fft), (dm, fm) = out.values()
    kept = (dm.mean - db.mean) / max(dft.mean - db.mean, 1e-9)
    print(f"(b) digit gain kept by the mix: {100 * kept:.0f}% (mean recall); flickr mean recall "
          f"vs base: fine-tuned {100 * (fft.mean / fb.mean - 1):+.1f}%, mix "
          f"{100 * (fm.mean / fb.mean - 1):+.1f}%; {time.perf_counter() - t:.0f} s for (b); "
          f"load average now {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
