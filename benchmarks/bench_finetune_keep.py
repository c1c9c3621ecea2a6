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
    ap.add_argument("--retain-set", default="flickr8k_train2k",
                    help="(b)'s retention pairs come from this dataset (the LiT heads were trained "
                    "on flickr8k_train2k: flickr8k_val1k past --val-files is unseen)")  # fmt: skip
    ap.add_argument("--retain-skip", type=int, default=None,
                    help="(b)'s retention slice starts after this many photos (default: --train-files)")  # fmt: skip
    ap.add_argument("--replay", type=lambda v: [float(x) for x in v.split(",")], default=[0, 0.25],
                    help="--replay fractions of (b), comma-separated; 0 is plain fine-tuning")  # fmt: skip
    ap.add_argument("--decay", type=lambda v: [float(x) for x in v.split(",")], default=[],
                    help="(b): also plain runs with these --weight-decay values (an L2 pull of "
                    "the head adapters towards the base weights, as L2-SP)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="of the fine-tuning runs")
    ap.add_argument("--val-curve", action="store_true",
                    help="(b): flickr val recall of every mix (alpha 0, 0.1, ... 1) of every run")  # fmt: skip
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
                  device="cpu", precision="fp32", seed=args.seed, feature_cache=cache, plot=False,
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

    # (b) forgetting: base, and per --replay fraction the fine-tuned endpoint and its WiSE-FT mix
    digits = manifest_pairs("digits_trimodal", 1000)
    skip = args.train_files if args.retain_skip is None else args.retain_skip
    retain = manifest_pairs(args.retain_set, args.retain_files, skip_files=skip)
    flickr_val = manifest_pairs("flickr8k_val1k", args.val_files)
    _, held = split_by_file(digits, 0.1, args.seed)  # the held-out digit files of every run
    t = time.perf_counter()
    models = {"base": (str(LIT), None)}
    # --decay: plain runs whose weight decay pulls the head adapters (zero: the base) to the base
    for fraction, decay in [(f, None) for f in args.replay] + [(0, d) for d in args.decay]:
        out, alpha, curve = endpoint_run(digits, retain, fraction, work, common, decay)
        name = "plain" if fraction == 0 else f"replay {fraction:g}"
        name += "" if decay is None else f", weight decay {decay:g}"
        models[f"{name} fine-tuned"] = (str(out), curve[-1]["target"]["mean"])
        mixed = mix_dir(LIT, out, alpha, work / f"{out.name}_mix{alpha:g}")
        models[f"{name} + WiSE-FT {alpha:g}"] = (str(mixed), row_at(curve, alpha)["target"]["mean"])
        if args.val_curve:
            val_curve(out, curve, flickr_val, work, cache)
    print(
        f"  {len(args.replay) + len(args.decay)} digit runs {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    out = {}
    print(
        "| model | digits t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 | mean || flickr val "
        "t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 | mean |"
    )
    for name, (path, reported) in models.items():
        d = shared_recall(path, held, cache)
        f = evaluate(flickr_val, path, device="cpu", precision="fp32", feature_cache=cache)
        out[name] = (d, f)
        print(f"| {name} | {fmt(d)} || {fmt(f)} |", flush=True)
        if reported is not None and abs(reported - d.mean) > 1e-3:  # same protocol, same weights
            print(f"    (the run reported {100 * reported:.1f} for it)")
    (db, fb) = out["base"]
    gain = {n.split(" fine-tuned")[0]: d.mean - db.mean for n, (d, _) in out.items()
            if n.endswith("fine-tuned")}  # fmt: skip
    plain_gain = gain.get("plain", max(gain.values()))
    print("(b) digit gain kept (of plain fine-tuning's, mean recall) | flickr mean recall vs base")
    for name, (d, f) in list(out.items())[1:]:
        print(f"  {name}: {100 * (d.mean - db.mean) / max(plain_gain, 1e-9):.0f}% | "
              f"{100 * (f.mean / fb.mean - 1):+.1f}%")  # fmt: skip
    print(f"{time.perf_counter() - t:.0f} s for (b); load average now {os.getloadavg()[0]:.1f}")


def endpoint_run(digits, retain, fraction: float, work: Path, common: dict, decay=None):
    """Fine-tune on the digits with `retain` and --replay `fraction`, saving the fine-tuned
    endpoint (alpha 1) instead of the mix; (its folder, the alpha the library would keep, the
    curve). For --method head the mix of merged weights is the mix of the adapters (linear in
    them), so `mix_dir` builds the kept model from the endpoint."""
    from mmsearch.finetune import FinetuneConfig, finetune, wise

    real = wise.choose
    wise.choose = lambda curve, max_forgetting: 1.0
    tag, kw = f"{fraction:g}", dict(common)
    if decay is not None:
        tag, kw["weight_decay"] = f"{tag}_decay{decay:g}", decay
    try:
        r = finetune(digits, FinetuneConfig(out=work / f"digits_replay{tag}", epochs=2,
                                            replay=fraction, **kw), retain_pairs=retain)  # fmt: skip
    finally:
        wise.choose = real
    alpha = real(r.mix.curve, r.mix.max_forgetting)
    print(f"  replay {tag}: {r.train_seconds:.1f} s training, {r.samples_per_s:.1f} "
          f"samples/s; {r.retention.line()}; kept alpha {alpha:g}", flush=True)  # fmt: skip
    for row in r.mix.curve:
        print(f"    alpha {row['alpha']:.1f}: held-out digits mean {row['target']['mean']:.4f}, "
              f"retention mean {row['retention']['mean']:.4f}, forgetting {row['forgetting']:.3f}")  # fmt: skip
    return r.out, alpha, r.mix.curve


def val_curve(end: Path, curve, flickr_val, work: Path, cache: Path) -> None:
    """Per alpha: held-out digits (from the run), retention forgetting, and flickr val recall."""
    from mmsearch.finetune import evaluate

    base = None
    for row in curve:
        path = mix_dir(LIT, end, row["alpha"], work / "scratch_mix")
        f = evaluate(flickr_val, str(path), device="cpu", precision="fp32", feature_cache=cache)
        base = base or f.mean
        print(f"    alpha {row['alpha']:.1f}: digits {100 * row['target']['mean']:.1f}, retention "
              f"lost {100 * row['forgetting']:.1f}%, flickr val {100 * f.mean:.1f} "
              f"({100 * (f.mean / base - 1):+.1f}%)", flush=True)  # fmt: skip


def row_at(curve, alpha):
    return next(r for r in curve if r["alpha"] == alpha)


def mix_dir(base: Path, end: Path, alpha: float, out: Path) -> Path:
    """A copy of model folder `end` whose weights are (1 - alpha) base + alpha end."""
    from safetensors.torch import load_file, save_file

    from mmsearch.finetune.wise import mix_state

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(end, out)
    a = load_file(str(base / "open_clip_model.safetensors"))
    b = load_file(str(end / "open_clip_model.safetensors"))
    save_file(mix_state(a, b, alpha), str(out / "open_clip_model.safetensors"))
    return out


if __name__ == "__main__":
    main()
