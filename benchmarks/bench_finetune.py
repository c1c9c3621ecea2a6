"""`mmsearch.finetune` against open_clip's own trainer (`open_clip_train`, shipped in the
open-clip-torch wheel): same initial weights, same pairs, same epochs, batch size, learning rate,
schedule and optimizer settings, fp32 on CPU. Reports training samples/s and, for both final
models, recall@1/5/10 both ways on flickr8k_val1k measured by `mmsearch.finetune.evaluate`.

Random towers cannot show real retrieval (see bench_lit.py for that); this compares speed and
checks that the loop learns at least as well. The model is a small random-init ViT/text
transformer so the run fits in minutes on two CPU cores.

open_clip_train needs pandas, braceexpand and webdataset (its `training` extra).

    python benchmarks/bench_finetune.py [--epochs 3] [--work /tmp/bench_finetune] [--json out.json]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets"

SMALL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}


def flickr(name: str):
    from mmsearch.finetune.pairs import Pair, PairSet

    root = DATA / name
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return PairSet([Pair((root / r["path"]).resolve(), r["text"].strip(), "image") for r in rows])


def run_open_clip_train(args, init: Path, train_csv: Path, logs: Path) -> dict:
    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", f"local-dir:{init}", "--train-data", str(train_csv), "--dataset-type", "csv",
        "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--wd", str(args.wd), "--warmup", str(args.warmup), "--beta1", "0.9", "--beta2", "0.98",
        "--eps", "1e-6", "--precision", "fp32", "--device", "cpu", "--workers", str(args.workers),
        "--seed", "0", "--logs", str(logs), "--name", "run", "--save-frequency", str(args.epochs),
        "--log-every-n-steps", "10", "--report-to", "",
    ]  # fmt: skip
    t = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(logs), env=env)
    wall = time.perf_counter() - t
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"open_clip_train failed ({proc.returncode}):\n{log[-4000:]}")
    # "... Batch (t): 0.512, 125.1/s, 125.1/s/gpu ..." per logged step; the first includes warmup
    rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)]
    steady = rates[1:] or rates
    return {
        "wall_s": wall,
        "samples_per_s": sum(steady) / max(1, len(steady)),
        "log_lines": len(rates),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_finetune"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=20)
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

    import open_clip
    import torch

    from mmsearch.encoders.clip import save_model_dir
    from mmsearch.finetune import FinetuneConfig, Recall, evaluate, finetune

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train, val = flickr("flickr8k_train2k"), flickr("flickr8k_val1k")
    torch.manual_seed(0)
    init = save_model_dir(open_clip.CLIP(**SMALL), SMALL, work / "init", {"size": 64})
    train_csv = work / "train.csv"
    with open(train_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows((str(p.path), p.caption) for p in train.pairs)

    print(f"open_clip_train: {len(train)} pairs, {args.epochs} epochs", flush=True)
    (work / "logs").mkdir()
    theirs = run_open_clip_train(args, init, train_csv, work / "logs")
    ckpt = work / "logs" / "run" / "checkpoints" / f"epoch_{args.epochs}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model = open_clip.create_model(f"local-dir:{init}")
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    theirs_dir = save_model_dir(model, SMALL, work / "theirs", {"size": 64})
    print(f"  {theirs['samples_per_s']:.1f} samples/s, {theirs['wall_s']:.0f}s wall", flush=True)

    print("mmsearch finetune (--method full)", flush=True)
    cfg = FinetuneConfig(
        model=str(init), out=work / "ours", method="full", epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.wd, warmup_steps=args.warmup,
        max_grad_norm=None, precision="fp32", device="cpu", seed=0, plot=False,
        workers=args.workers,
    )  # fmt: skip
    t = time.perf_counter()
    ours = finetune(train, cfg, val_pairs=val)
    ours_wall = time.perf_counter() - t
    print(f"  {ours.samples_per_s:.1f} samples/s, {ours_wall:.0f}s wall", flush=True)

    t = time.perf_counter()
    r_theirs = evaluate(val, str(theirs_dir), device="cpu", precision="fp32")
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
        f"| mmsearch finetune, kept model (best epoch {ours.best_epoch}) | {ours.samples_per_s:.1f} | {ours_wall:.0f} | {cells(r_ours)} |",
        f"| mmsearch finetune, last epoch | | | {cells(Recall.from_dict(last))} |",
    ]  # fmt: skip
    print("\n".join(lines))
    print(
        f"\nspeed ratio (ours / open_clip_train, training steps): "
        f"{ours.samples_per_s / theirs['samples_per_s']:.2f}x; our wall time includes decoding "
        f"once and evaluating val1k before training and after every epoch; torch threads "
        f"{args.threads} each; load average at start {load:.1f} on {os.cpu_count()} cores; final "
        f"evaluation {eval_s:.0f}s"
    )
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "theirs": theirs,
            "theirs_recall": r_theirs.to_dict(), "ours_recall": r_ours.to_dict(),
            "ours_samples_per_s": ours.samples_per_s, "ours_wall_s": ours_wall,
            "ours_history": ours.history, "initial_recall": init_r.to_dict(), "load_average_start": load,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
