"""Fine-tuning on audio pairs, digits_trimodal: what the projector fit and the trained CLAP audio
head each add, side by side in one run.

    python benchmarks/bench_finetune_audio.py [--per-class 50] [--test-speaker nicolas]
                                              [--steps 300] [--threads N] [--json]

Data: ../shared/datasets/digits_trimodal, (recording, digit word) pairs. Training: the first
`--per-class` recordings of each digit of three speakers; held out (what `finetune --val` does):
the same number from `--test-speaker`. The gallery for audio->text is the ten words; text->audio
has ten queries (one per word) over the held-out recordings, a hit when any recording of that digit
ranks in the top k (`recall_shared_captions`), so its R@5/R@10 are coarse.

Models: random weights (no pretrained CLAP or CLIP can be installed here), so only the relative
figures mean anything. CLIP: open_clip ViT-B-32, random. CLAP: a smaller random ClapConfig than
laion/clap-htsat-unfused so the run fits a 2-core CPU: HTSAT with patch width 48, depths 1-1-2-1
(3.2M parameters vs 28M), 64 mels at 16 kHz in 2 s windows (every digit is one window), spec 128;
the laion text tower shrunk to 4 layers of width 256; the audio projection head keeps laion's shape
(hidden -> 512 -> 512, ReLU). Written once to benchmarks/out/.

Rows, all scored on the held-out speaker by `train_audio_projector` in one call:
  before     the text-bridge projector (fitted on every 4th shipped caption, no audio)
  projector  the projector fitted on the training pairs (ridge + InfoNCE), CLAP frozen
  + head     CLAP's audio projection head trained jointly with that projector (--audio-tower
             head): `--steps` steps of 64 pairs on HTSAT features computed once per window
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

import common
from common import DATASETS, machine, random_model_dir, require_datasets

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPEAKERS = ("george", "jackson", "lucas", "nicolas")


def small_random_clap_dir(seed: int = 0) -> Path:
    """A random ClapModel smaller than laion/clap-htsat-unfused (see the module docstring)."""
    feature_extractor = dict(
        feature_size=64, sampling_rate=16000, hop_length=160, max_length_s=2,
        fft_window_size=400, frequency_min=50, frequency_max=8000,
    )  # fmt: skip
    audio = dict(
        spec_size=128, num_mel_bins=64, patch_size=4, patch_stride=(4, 4), window_size=4,
        patch_embeds_hidden_size=48, depths=[1, 1, 2, 1], num_attention_heads=[2, 4, 8, 16],
        hidden_size=384,
    )  # fmt: skip
    text = dict(
        vocab_size=2000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024,
    )  # fmt: skip
    return common.random_clap_dir("clap-small-random", seed, feature_extractor, audio, text)


def digit_pairs(speakers: set[str], per_class: int):
    """(path, word) of the first `per_class` recordings per (speaker, digit), manifest order."""
    from mmsearch.finetune.pairs import Pair, PairSet
    from mmsearch.records import AUDIO

    root = DATASETS / "digits_trimodal"
    counts: dict[tuple[str, str], int] = {}
    pairs = []
    for r in csv.DictReader(open(root / "manifest.csv")):
        key = (r["speaker"], r["label"])
        if r["modality"] == "audio" and r["speaker"] in speakers and counts.get(key, 0) < per_class:
            counts[key] = counts.get(key, 0) + 1
            pairs.append(Pair(root / r["path"], r["text"], AUDIO))
    return PairSet(pairs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=50, help="recordings per digit and speaker")
    ap.add_argument("--test-speaker", default="nicolas", choices=SPEAKERS)
    ap.add_argument("--steps", type=int, default=300, help="audio head training steps")
    ap.add_argument("--bridge-every", type=int, default=4, help="bridge fit: every Nth caption")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: auto)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    require_datasets()

    import torch

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    # Oversubscribed cores make 2 threads slower than 1 (see RESULTS.md, issue 4).
    threads = args.threads or (1 if load > cores else cores)
    torch.set_num_threads(threads)

    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders.clap import (
        PROJECTOR_FILENAME,
        load_audio_tower,
        read_captions,
        save_projector,
    )
    from mmsearch.encoders.clip import load_clip
    from mmsearch.finetune.audio import HeadSettings, train_audio_projector

    clap_dir = small_random_clap_dir()
    clip_dir = random_model_dir("ViT-B-32")
    train = digit_pairs(set(SPEAKERS) - {args.test_speaker}, args.per_class)
    val = digit_pairs({args.test_speaker}, args.per_class)

    work = Path(tempfile.mkdtemp(prefix="bench-ft-audio-"))
    try:
        start = work / "start"
        shutil.copytree(clip_dir, start)
        t = time.perf_counter()
        enc = load_clip(ModelSpec.parse(str(start)), EncoderOptions(device="cpu", precision="fp32"))
        bridge = load_audio_tower(
            str(clap_dir), enc, work / "cache", captions=read_captions()[:: args.bridge_every]
        )
        save_projector(bridge.projector, start / PROJECTOR_FILENAME)
        bridge_s = time.perf_counter() - t
        del enc, bridge

        marks: dict[str, float] = {}

        def progress(event: str, **info) -> None:
            if event == "embed-audio" and info["done"] == info["total"]:
                marks["features"] = time.perf_counter()
            elif event == "audio-step" and info["step"] == 1:
                marks["head_start"] = time.perf_counter()

        t = time.perf_counter()
        result = train_audio_projector(
            train,
            start,
            str(clap_dir),
            work / "cache",
            seed=0,
            device="cpu",
            progress=progress,
            val_pairs=val,
            tower="head",
            head_settings=HeadSettings(steps=args.steps),
        )
        end = time.perf_counter()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    files = len({p.path for p in train.pairs}) + len({p.path for p in val.pairs})
    head_s = end - marks["head_start"]
    report = {
        "machine": machine(),
        "load_average": round(load, 2),
        "torch_threads": threads,
        "models": "random weights: open_clip ViT-B-32; small ClapConfig (HTSAT 3.2M params)",
        "train": f"{len(train)} pairs, speakers other than {args.test_speaker}",
        "val": f"{len(val)} pairs, speaker {args.test_speaker}",
        "bridge_fit_s": round(bridge_s, 1),
        "features": {
            "files": files,
            "seconds": round(marks["features"] - t, 1),
            "files_per_s": round(files / (marks["features"] - t), 2),
        },
        "head": {"steps": args.steps, "seconds": round(head_s, 1)},
        "total_s": round(end - t, 1),
        "result": result.to_dict(),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['machine']}; load {load:.2f}; {threads} torch thread(s)")
    print(f"train {report['train']}; held out {report['val']}")
    print(
        f"bridge fit {bridge_s:.0f} s; HTSAT features {files} files in "
        f"{report['features']['seconds']} s ({report['features']['files_per_s']} files/s); "
        f"head {args.steps} steps in {head_s:.1f} s; total {end - t:.0f} s"
    )
    r = result.to_dict()
    print("| held-out speaker | a→t R@1 | R@5 | R@10 | t→a R@1 | R@5 | R@10 | mean |")
    print("|---|---|---|---|---|---|---|---|")
    for key, name in (
        ("before", "text-bridge projector (before)"),
        ("after", "fitted projector"),
        ("head", "fitted projector + trained audio head"),
    ):
        x = r[key]
        cells = [x["image_to_text"][f"R@{k}"] for k in (1, 5, 10)]
        cells += [x["text_to_image"][f"R@{k}"] for k in (1, 5, 10)]
        print(
            f"| {name} | "
            + " | ".join(f"{100 * c:.1f}" for c in cells)
            + f" | {100 * x['mean']:.1f} |"
        )
    print(
        f"kept: {r['kept']}; head training loss {r['head_loss']['start']:.3f} -> "
        f"{r['head_loss']['end']:.3f} (best held-out step {r['head_step']})"
    )


if __name__ == "__main__":
    main()
