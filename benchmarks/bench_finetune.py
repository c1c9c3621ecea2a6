"""`mmsearch.finetune` against open_clip's own trainer (`open_clip_train`, shipped in the
open-clip-torch wheel): same initial weights, same pairs, same epochs, batch size, learning rate,
schedule and optimizer settings, fp32 on CPU, one torch thread each. Reports training samples/s of
both and, for both final models:

- flickr8k: train on flickr8k_train2k, recall@1/5/10 both ways on flickr8k_val1k measured by
  `mmsearch.finetune.evaluate`.
- digits: the image half of digits_trimodal (1,000 MNIST digits, caption = the digit's word;
  the manifest has no train/test split, so a seeded split stratified by class: 80 train + 20 test
  images per digit). Ten captions are each shared by ~100 images, so per-file recall means little
  there; measured instead, on the 200 test images against the 10 distinct captions:
  image->text R@1/R@5 (= top-1/top-5 zero-shot classification accuracy; R@10 is 100% by
  construction; chance 10% / 50%) and text->image precision@10 and mAP over the test images
  (chance ~10%). Ties count against the model.

Random towers cannot show real retrieval (see bench_lit.py for that); this compares speed and
checks that the loop learns at least as well. The models are small random-init ViT/text
transformers so the run fits in minutes on two CPU cores.

open_clip_train needs pandas, braceexpand and webdataset (its `training` extra).

    python benchmarks/bench_finetune.py [--dataset flickr8k|digits|both] [--epochs 1]
        [--digits-epochs 15] [--limit N] [--work /tmp/bench_finetune] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets"

SMALL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
# MNIST digits are 28x28: a 28 px ViT with 4 px patches sees them at native resolution (49 patches,
# about the 64 of the flickr model), the text tower is the flickr one.
DIGITS = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 28, "layers": 4, "width": 128, "patch_size": 4},
    "text_cfg": SMALL["text_cfg"],
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def flickr(name: str, limit: int | None = None):
    from mmsearch.finetune.pairs import Pair, PairSet

    root = DATA / name
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = [Pair((root / r["path"]).resolve(), r["text"].strip(), "image") for r in rows]
    if limit:  # the first `limit` files with all their captions (smoke runs)
        keep = set(list(dict.fromkeys(p.path for p in pairs))[:limit])
        pairs = [p for p in pairs if p.path in keep]
    return PairSet(pairs)


def digits(per_class_test: int = 20, seed: int = 0, limit: int | None = None):
    """(train, test) PairSets of digits_trimodal's images, split per class with a seeded draw."""
    from mmsearch.finetune.pairs import Pair, PairSet

    root = DATA / "digits_trimodal"
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["modality"] == "image"]
    splits = {r["split"] for r in rows}
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in sorted({r["label"] for r in rows}, key=int):
        of = sorted((r for r in rows if r["label"] == label), key=lambda r: r["path"])
        if {"train", "test"} <= splits:
            tr = [r for r in of if r["split"] == "train"]
            te = [r for r in of if r["split"] == "test"]
        else:  # the manifest says split=dev for every row
            perm = rng.permutation(len(of))
            te = [of[i] for i in perm[:per_class_test]]
            tr = [of[i] for i in perm[per_class_test:]]
        if limit:
            tr, te = tr[:limit], te[: max(2, limit // 4)]
        for side, rs in ((train, tr), (test, te)):
            side.extend(Pair((root / r["path"]).resolve(), r["text"].strip(), "image") for r in rs)
    order = rng.permutation(len(train))  # rows of open_clip_train's CSV: not sorted by class
    return PairSet([train[i] for i in order]), PairSet(test)


def open_clip_rate(log: str, batch_size: int) -> dict:
    """Training throughput from open_clip_train's log lines
    `Train Epoch: E [N/M (p%)] Data (t): d Batch (t): b, r/s, ...`: `b` is the mean batch time
    of the window since the previous line, N the samples done in the epoch. The first window of
    each epoch (one batch, which waits for the loader workers to start) is left out."""
    lines = re.findall(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*?Batch \(t\): ([\d.]+),", log)
    samples = seconds = 0.0
    prev: tuple[int, int] | None = None
    for e, n, b in lines:
        e, n, b = int(e), int(n), float(b)
        if prev is not None and prev[0] == e:
            samples += n - prev[1]
            seconds += b * (n - prev[1]) / batch_size  # b per batch, (n - prev) / bs batches
        prev = (e, n)
    return {"samples_per_s": samples / seconds if seconds else 0.0, "log_lines": len(lines)}


def run_open_clip_train(
    init: Path, train_csv: Path, logs: Path, hp: dict, threads: int, workers: int
) -> dict:
    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", f"local-dir:{init}", "--train-data", str(train_csv), "--dataset-type", "csv",
        "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--epochs", str(hp["epochs"]), "--batch-size", str(hp["batch_size"]), "--lr", str(hp["lr"]),
        "--wd", str(hp["wd"]), "--warmup", str(hp["warmup"]), "--beta1", "0.9", "--beta2", "0.98",
        "--eps", "1e-6", "--precision", "fp32", "--device", "cpu", "--workers", str(workers),
        "--seed", "0", "--logs", str(logs), "--name", "run", "--save-frequency", str(hp["epochs"]),
        "--log-every-n-steps", str(hp["log_every"]), "--report-to", "",
    ]  # fmt: skip
    t = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(logs), env=env)
    wall = time.perf_counter() - t
    log = proc.stdout + proc.stderr
    (logs / "open_clip_train.log").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"open_clip_train failed ({proc.returncode}):\n{log[-4000:]}")
    return {"wall_s": wall, **open_clip_rate(log, hp["batch_size"])}


def train_both(args, name: str, model_cfg: dict, size: int, train, val, hp: dict) -> dict:
    """Both trainers from the same random-init weights on `train`; ours evaluates on `val` after
    every epoch (per-file recall, which picks its kept epoch) and keeps its last checkpoint."""
    import open_clip
    import torch

    from mmsearch.encoders.clip import save_model_dir
    from mmsearch.finetune import FinetuneConfig, finetune

    work = args.work / name
    work.mkdir(parents=True)
    torch.manual_seed(0)
    init = save_model_dir(open_clip.CLIP(**model_cfg), model_cfg, work / "init", {"size": size})
    train_csv = work / "train.csv"
    with open(train_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows((str(p.path), p.caption) for p in train.pairs)

    load = {"open_clip_train": os.getloadavg()[0]}
    print(f"[{name}] open_clip_train: {len(train)} pairs, {hp['epochs']} epochs", flush=True)
    (work / "logs").mkdir()
    theirs = run_open_clip_train(init, train_csv, work / "logs", hp, args.threads, args.workers)
    ckpt = work / "logs" / "run" / "checkpoints" / f"epoch_{hp['epochs']}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model = open_clip.create_model(f"local-dir:{init}")
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    theirs_dir = save_model_dir(model, model_cfg, work / "theirs", {"size": size})
    print(f"  {theirs['samples_per_s']:.1f} samples/s, {theirs['wall_s']:.0f}s wall", flush=True)

    load["mmsearch"] = os.getloadavg()[0]
    print(f"[{name}] mmsearch finetune (--method full)", flush=True)
    cfg = FinetuneConfig(
        model=str(init), out=work / "ours", method="full", epochs=hp["epochs"],
        batch_size=hp["batch_size"], lr=hp["lr"], weight_decay=hp["wd"], warmup_steps=hp["warmup"],
        max_grad_norm=None, precision="fp32", device="cpu", seed=0, plot=False,
        workers=args.workers, keep_checkpoint=True,
    )  # fmt: skip
    t = time.perf_counter()
    ours = finetune(train, cfg, val_pairs=val)
    ours_wall = time.perf_counter() - t
    print(f"  {ours.samples_per_s:.1f} samples/s, {ours_wall:.0f}s wall", flush=True)
    # the last epoch's weights (the kept model is the best epoch by per-file recall)
    from safetensors.torch import load_file

    last_ckpt = max((work / "ours" / "checkpoint").glob("step-*"), key=lambda p: p.name)
    model = open_clip.create_model(f"local-dir:{init}")
    model.load_state_dict(load_file(str(last_ckpt / "trainable.safetensors")), strict=False)
    ours_last = save_model_dir(model, model_cfg, work / "ours_last", {"size": size})
    return {
        "init": init, "theirs": theirs, "theirs_dir": theirs_dir, "ours": ours,
        "ours_wall": ours_wall, "ours_last": ours_last, "load": load,
    }  # fmt: skip


def class_measures(model_dir: Path, test, classes: list[str]) -> dict:
    """Class-level retrieval on `test` (one caption per image, the class word) against the
    distinct captions `classes`, through the same encoder path as indexing (`load_clip`)."""
    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders.clip import load_clip
    from mmsearch.finetune.evaluate import decode_images

    enc = load_clip(ModelSpec.parse(str(model_dir)), EncoderOptions(device="cpu", precision="fp32"))
    files = [p.path for p in test.pairs]
    label = np.array([classes.index(p.caption) for p in test.pairs])
    img = enc.image.embed(decode_images(files, enc.prep), 64)
    txt = enc.text.embed(list(classes), 64)
    sims = img @ txt.T  # (images, classes)
    own = sims[np.arange(len(label)), label]
    rank = (sims >= own[:, None]).sum(1) - 1  # ties count against
    out = {f"i2t_R@{k}": float((rank < k).mean()) for k in (1, 5)}
    p10, aps = [], []
    for c in range(len(classes)):
        rel = label == c
        # descending score; among equal scores the non-matching images first (ties against)
        order = np.lexsort((rel, -sims[:, c]))
        hits = rel[order]
        p10.append(hits[:10].mean())
        cum = np.cumsum(hits)
        aps.append(float((cum / np.arange(1, len(hits) + 1))[hits].mean()))
    out["t2i_P@10"] = float(np.mean(p10))
    out["t2i_mAP"] = float(np.mean(aps))
    return out


def _loads(load: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in load.items())


def bench_flickr(args) -> dict:
    from mmsearch.finetune import Recall, evaluate

    train, val = flickr("flickr8k_train2k", args.limit), flickr("flickr8k_val1k", args.limit)
    hp = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd,
          "warmup": args.warmup, "log_every": 10}  # fmt: skip
    r = train_both(args, "flickr8k", SMALL, 64, train, val, hp)
    theirs, ours = r["theirs"], r["ours"]
    t = time.perf_counter()
    r_theirs = evaluate(val, str(r["theirs_dir"]), device="cpu", precision="fp32")
    r_ours = evaluate(val, str(ours.out), device="cpu", precision="fp32")
    eval_s = time.perf_counter() - t
    init_r = ours.before

    def cells(r):
        t2i, i2t = r.text_to_image, r.image_to_text
        return " | ".join(
            f"{100 * x:.2f}" for x in (t2i[1], t2i[5], t2i[10], i2t[1], i2t[5], i2t[10])
        )

    last = ours.history[-1]["recall"]
    lines = [
        f"| flickr8k_train2k → val1k, {args.epochs} epochs | train samples/s | wall s | t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| initial weights | | | {cells(init_r)} |",
        f"| open_clip_train | {theirs['samples_per_s']:.1f} | {theirs['wall_s']:.0f} | {cells(r_theirs)} |",
        f"| mmsearch finetune, kept model (best epoch {ours.best_epoch}) | {ours.samples_per_s:.1f} | {r['ours_wall']:.0f} | {cells(r_ours)} |",
        f"| mmsearch finetune, last epoch | | | {cells(Recall.from_dict(last))} |",
    ]  # fmt: skip
    print("\n".join(lines))
    print(
        f"\nspeed ratio (ours / open_clip_train, training steps): "
        f"{ours.samples_per_s / theirs['samples_per_s']:.2f}x; our wall time includes decoding "
        f"once and evaluating val1k before training and after every epoch; final evaluation "
        f"{eval_s:.0f}s; load average (1 min) as each trainer started: {_loads(r['load'])}"
    )
    return {
        "theirs": theirs, "theirs_recall": r_theirs.to_dict(), "ours_recall": r_ours.to_dict(),
        "ours_samples_per_s": ours.samples_per_s, "ours_wall_s": r["ours_wall"],
        "ours_history": ours.history, "initial_recall": init_r.to_dict(), "load": r["load"],
    }  # fmt: skip


def bench_digits(args) -> dict:
    train, test = digits(limit=args.limit)
    hp = {"epochs": args.digits_epochs, "batch_size": args.digits_batch_size,
          "lr": args.digits_lr, "wd": args.wd, "warmup": args.digits_warmup, "log_every": 1}  # fmt: skip
    r = train_both(args, "digits", DIGITS, 28, train, test, hp)
    theirs, ours = r["theirs"], r["ours"]
    rows = [
        ("initial weights", r["init"], "", ""),
        ("open_clip_train", r["theirs_dir"], f"{theirs['samples_per_s']:.1f}", f"{theirs['wall_s']:.0f}"),
        ("mmsearch finetune, last epoch", r["ours_last"], f"{ours.samples_per_s:.1f}", f"{r['ours_wall']:.0f}"),
        (f"mmsearch finetune, kept model (best epoch {ours.best_epoch} by per-file recall)", ours.out, "", ""),
    ]  # fmt: skip
    keys = ("i2t_R@1", "i2t_R@5", "t2i_P@10", "t2i_mAP")
    measured = {}
    lines = [
        f"| digits_trimodal images, {len(train)} train / {len(test)} test, {hp['epochs']} epochs "
        "| train samples/s | wall s | i→t R@1 (top-1 acc.) | i→t R@5 | t→i P@10 | t→i mAP |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, model_dir, rate, wall in rows:
        m = class_measures(model_dir, test, list(DIGIT_WORDS))
        measured[label] = m
        lines.append(
            f"| {label} | {rate} | {wall} | " + " | ".join(f"{100 * m[k]:.1f}" for k in keys) + " |"
        )
    print("\n".join(lines))
    print(
        f"\nspeed ratio (ours / open_clip_train, training steps): "
        f"{ours.samples_per_s / theirs['samples_per_s']:.2f}x; chance: i→t R@1 10%, R@5 50%, "
        f"t→i P@10 10%, mAP ~12%; load average (1 min) as each trainer started: {_loads(r['load'])}"
    )
    return {
        "theirs": theirs, "ours_samples_per_s": ours.samples_per_s, "ours_wall_s": r["ours_wall"],
        "ours_best_epoch": ours.best_epoch, "ours_history": ours.history, "class_measures": measured,
        "hp": hp, "train_images": len(train), "test_images": len(test), "load": r["load"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("flickr8k", "digits", "both"), default="both")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_finetune"))
    ap.add_argument(
        "--limit", type=int, help="smoke run: flickr files per split / digits per class"
    )
    ap.add_argument("--epochs", type=int, default=1, help="flickr8k")
    ap.add_argument("--batch-size", type=int, default=64, help="flickr8k")
    ap.add_argument("--lr", type=float, default=5e-4, help="flickr8k")
    ap.add_argument("--warmup", type=int, default=20, help="flickr8k warmup steps")
    ap.add_argument("--digits-epochs", type=int, default=15)
    ap.add_argument(
        "--digits-batch-size", type=int, default=50, help="800 train images: 16 full batches"
    )
    ap.add_argument("--digits-lr", type=float, default=5e-4)
    ap.add_argument("--digits-warmup", type=int, default=32)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=2, help="data loader workers / decode threads")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both trainers (on 2 cores, 2 threads plus open_clip_train's "
        "loader workers oversubscribe: it ran 3x slower than with 1)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average_start": load}
    if args.dataset in ("flickr8k", "both"):
        results["flickr8k"] = bench_flickr(args)
    if args.dataset in ("digits", "both"):
        results["digits"] = bench_digits(args)
    print(
        f"\ntorch threads {args.threads} each; load average at start "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
