"""The audio path: indexing throughput next to the tower alone, and digits_trimodal precision@10.

    python benchmarks/bench_audio.py [--clap DIR_OR_ID] [--clip SPEC] [--per-class 10] [--json]

Models: `--clap` and `--clip` name real weights where they can be had. Without them the run uses the
laion/clap-htsat-unfused architecture (HTSAT-tiny audio tower, RoBERTa text tower) and ViT-B-32
with random weights: the same FLOPs, so throughput is real, but retrieval is then at chance.

Throughput (one run, same tower): the audio tower alone on pre-decoded 10 s windows; decode +
window + embed of a 5-minute 44.1 kHz stereo recording (windows every 7.5 s); and of spoken-digit
WAVs (8 kHz, ~0.5 s: one repeat-padded window each, so short files cost a full window).

Retrieval on ../shared/datasets/digits_trimodal, speaker `--test-speaker` held out (queries and
targets from that speaker only; chance is 0.1 everywhere):
  audio->text  top-1 accuracy over the ten words ("zero" .. "nine") as CLIP text
  text->audio  precision@10 of each word among the held-out recordings
  audio->image precision@10 among MNIST images
  audio->audio precision@10 among the other held-out recordings
for two projectors: the text bridge (fit on the shipped captions, no audio) and a projector fit on
the other speakers' (recording, digit word) pairs (`fit_projector_from_embeddings`: what fine-tuning
on audio pairs does to the projector alone).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from common import DATASETS, OUT, machine, random_model_dir, require_datasets

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def random_clap_dir(seed: int = 0) -> Path:
    """laion/clap-htsat-unfused's architecture with random weights, in from_pretrained layout."""
    return common.random_clap_dir("clap-htsat-unfused-random", seed)


def digits_rows(per_class: int, speakers: set[str] | None, limit_images: int | None = None):
    root = DATASETS / "digits_trimodal"
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    audio, images, counts = [], [], {}
    for r in rows:
        key = (r["modality"], r["speaker"], r["label"])
        n = counts.get(key, 0)
        if r["modality"] == "audio" and (speakers is None or r["speaker"] in speakers):
            if n < per_class:
                audio.append((root / r["path"], int(r["label"]), r["speaker"]))
                counts[key] = n + 1
        elif r["modality"] == "image" and limit_images is not None and n < limit_images:
            images.append((root / r["path"], int(r["label"])))
            counts[key] = n + 1
    return audio, images


def precision_at_10(q: np.ndarray, q_labels, t: np.ndarray, t_labels, exclude_self=False) -> float:
    sims = q @ t.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :10]
    return float((np.asarray(t_labels)[top] == np.asarray(q_labels)[:, None]).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clap", default=None, help="ClapModel id or dir (default: random weights)")
    ap.add_argument("--clip", default=None, help="open_clip spec (default: random ViT-B-32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-class", type=int, default=10, help="held-out recordings per digit")
    ap.add_argument("--train-per-class", type=int, default=10, help="per digit and other speaker")
    ap.add_argument("--images-per-class", type=int, default=10)
    ap.add_argument("--test-speaker", default="nicolas")
    ap.add_argument("--tower-windows", type=int, default=16)
    ap.add_argument("--long-seconds", type=float, default=300.0)
    ap.add_argument("--captions", type=int, default=0, help="bridge-fit captions (0: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    require_datasets()

    import soundfile as sf
    import torch

    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders.base import l2_normalize
    from mmsearch.encoders.clap import (
        FitSettings,
        Projector,
        fit_projector_from_embeddings,
        load_audio_tower,
        read_captions,
    )
    from mmsearch.encoders.clip import load_clip
    from mmsearch.loaders.audio import load_audio
    from mmsearch.loaders.image import load_image

    result: dict = {"machine": machine(), "torch_threads": torch.get_num_threads()}
    clap_src = args.clap or str(random_clap_dir())
    clip_spec = ModelSpec.parse(args.clip or str(random_model_dir("ViT-B-32")))
    result["models"] = {
        "clap": args.clap or "laion/clap-htsat-unfused architecture, random weights",
        "clip": args.clip or "ViT-B-32, random weights",
    }
    encoder = load_clip(clip_spec, EncoderOptions(device=args.device))
    captions = read_captions()
    if args.captions:
        captions = captions[:: max(1, len(captions) // args.captions)]
    stages: dict[str, float] = {}

    def progress(stage, done, total):
        stages.setdefault(stage, time.perf_counter())

    t0 = time.perf_counter()
    tower = load_audio_tower(
        clap_src,
        encoder,
        OUT / "audio-cache",
        device=args.device,
        progress=progress,
        captions=captions,
    )
    result["bridge_fit"] = {
        "seconds_incl_load": round(time.perf_counter() - t0, 1),
        "fitted_now": bool(stages),
        "captions": len(captions),
        "meta": {k: v for k, v in tower.projector.meta.items() if k.startswith(("val", "method"))},
    }
    windowing = tower.loader_settings()

    # --- throughput ----------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    win = int(tower.window_s * tower.sample_rate)
    windows = [
        (0.1 * rng.standard_normal(win)).astype(np.float32) for _ in range(args.tower_windows)
    ]
    tower.embed(windows[: tower.batch_size])  # warm-up
    t = time.perf_counter()
    tower.embed(windows)
    tower_s = time.perf_counter() - t
    thr = {
        "tower_windows_per_s": round(len(windows) / tower_s, 2),
        "tower_audio_s_per_s_at_hop": round(len(windows) * tower.hop_s / tower_s, 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        long = Path(tmp) / "long.wav"
        n = int(args.long_seconds * 44100)
        sf.write(str(long), (0.1 * rng.standard_normal((n, 2))).astype(np.float32), 44100)
        t = time.perf_counter()
        aw = load_audio(long, windowing)
        decode_s = time.perf_counter() - t
        tower.embed([w for _, _, w in aw.windows])
        total_s = time.perf_counter() - t
    thr["long_file"] = {
        "seconds_of_audio": args.long_seconds,
        "windows": len(aw.windows),
        "decode_s": round(decode_s, 2),
        "decode_audio_s_per_s": round(args.long_seconds / decode_s, 1),
        "load_embed_audio_s_per_s": round(args.long_seconds / total_s, 1),
        "tower_alone_same_windows_est_s": round(len(aw.windows) / thr["tower_windows_per_s"], 1),
        "load_embed_s": round(total_s, 1),
    }

    # --- digits_trimodal -----------------------------------------------------------------------
    test_audio, images = digits_rows(args.per_class, {args.test_speaker}, args.images_per_class)
    train_speakers = {"george", "jackson", "lucas", "nicolas"} - {args.test_speaker}
    train_audio, _ = digits_rows(args.train_per_class, train_speakers)

    def embed_files(rows):
        """CLAP embeddings (mean over a file's windows) and the decoded seconds."""
        clap_vecs, seconds = [], 0.0
        for path, *_ in rows:
            aw = load_audio(path, windowing)
            seconds += aw.duration
            z = tower.embed_clap([w for _, _, w in aw.windows])
            clap_vecs.append(l2_normalize(z.mean(0)))
        return np.stack(clap_vecs), seconds

    t = time.perf_counter()
    z_test, test_seconds = embed_files(test_audio)
    digits_s = time.perf_counter() - t
    thr["digits_files"] = {
        "files": len(test_audio),
        "files_per_s": round(len(test_audio) / digits_s, 2),
        "audio_s_per_s": round(test_seconds / digits_s, 2),
        "mean_file_s": round(test_seconds / len(test_audio), 2),
    }
    result["throughput"] = thr
    z_train, _ = embed_files(train_audio)
    a_labels = [lab for _, lab, _ in test_audio]
    train_labels = [lab for _, lab, _ in train_audio]
    words = encoder.encode_text(WORDS)
    imgs = encoder.encode_image([load_image(p, encoder.prep) for p, _ in images])
    i_labels = [lab for _, lab in images]

    def scores(proj: Projector) -> dict:
        a = l2_normalize(proj(z_test))
        return {
            "audio_to_text_acc": float((np.argmax(a @ words.T, 1) == np.asarray(a_labels)).mean()),
            "text_to_audio_p10": precision_at_10(words, list(range(10)), a, a_labels),
            "audio_to_image_p10": precision_at_10(a, a_labels, imgs, i_labels),
            "audio_to_audio_p10": precision_at_10(a, a_labels, a, a_labels, exclude_self=True),
        }

    paired = fit_projector_from_embeddings(
        z_train, words[np.asarray(train_labels)], FitSettings(val_fraction=0.15)
    )
    result["digits_trimodal"] = {
        "test_speaker": args.test_speaker,
        "queries": len(test_audio),
        "images": len(images),
        "train_pairs": len(train_audio),
        "chance": 0.1,
        "text_bridge": scores(tower.projector),
        "fit_on_other_speakers": scores(paired),
        "fit_on_other_speakers_method": paired.meta["method"],
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
