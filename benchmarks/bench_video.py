"""The video path: what the loader costs next to the image tower on the frames it keeps, keyframes
first (the loader now) and every frame others refer to (the loader before, NONREF), in one run.

    python benchmarks/bench_video.py [--seconds 60] [--long-minutes 10] [--repeat 3] [--json]

Three 720p H.264 videos are generated once (cached in benchmarks/out/): "multi", scenes made of
Flickr8k photos from ../shared/datasets (1.5 to 12 s each, every one slowly panning and zooming,
x264 with B-frames and its defaults: a keyframe at every cut, at most 250 frames apart),
"static", one photo with a little sensor noise (a talk, a security camera), and "gop30", the
scenes of "multi" encoded as phones do: a keyframe every 30 frames (1 s) and none at the cuts
(most of its cuts, at whole seconds, still fall on keyframes), and "gop45", the same with a
keyframe every 45 frames (1.5 s), where most cuts fall inside a group of pictures.
For each, in one run:

  old loader        iter_shots with Sampling(keyframes=False): decode every frame others refer
                    to, compare thumbnails, keep and prepare frames (224 px)
  new loader        iter_shots: keyframes first, groups of pictures decoded inside where needed
  image tower       ViT-B-32 (random weights: same FLOPs) on the frames each kept, batch 16

and prints frames decoded, shots kept (and their seconds), the groups decoded inside, and the
ratio loader / image tower on the kept frames (the issue's target: at most 0.2), in wall time
and in CPU time (the process's, all threads: on a shared machine the wall-time ratio moves with
the load, the CPU-time one much less; use `--threads 1` so that the tower's threads do not spin
while waiting); each time is the best of `--repeat` interleaved runs. A long video (the multi one remuxed `--long-minutes`
minutes long, no re-encoding) gives the loader's peak memory next to the 1-minute one's, each
in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from common import DATASETS, OUT, machine, random_model_dir, require_datasets

W, H, FPS = 1280, 720, 30


def photos(n: int) -> list[Path]:
    return sorted((DATASETS / "flickr8k_val1k" / "images").glob("*.jpg"))[:n]


def _encoder(path: Path, x264_params: str | None = None):
    import av

    out = av.open(str(path), "w")
    v = out.add_stream("libx264", rate=FPS)
    v.width, v.height, v.pix_fmt = W, H, "yuv420p"
    v.options = {"preset": "veryfast", "crf": "23"}
    if x264_params:
        v.options["x264-params"] = x264_params
    return out, v


def _write(out, v, frames) -> None:
    import av

    for n, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, "rgb24")
        frame.pts, frame.time_base = n, Fraction(1, FPS)
        out.mux(v.encode(frame))
    out.mux(v.encode(None))
    out.close()


def _pan(img, seconds: float, rng):
    """Frames of a slow pan and zoom across `img` (a PIL image) for `seconds`."""
    from PIL import Image

    big = img.convert("RGB").resize((int(W * 1.3), int(H * 1.3)), Image.BILINEAR)
    n = int(seconds * FPS)
    dx, dy = rng.uniform(-1, 1, 2) * (0.12 * W, 0.12 * H)
    for i in range(n):
        f = i / max(n - 1, 1)
        x = int(np.clip(0.15 * W + dx * f, 0, big.width - W))
        y = int(np.clip(0.15 * H + dy * f, 0, big.height - H))
        yield np.asarray(big.crop((x, y, x + W, y + H)))


def make_multi(path: Path, seconds: float, x264_params: str | None = None) -> list[float]:
    """Scenes of 1.5-12 s from different photos; returns the seconds each scene starts at."""
    from PIL import Image

    rng = np.random.default_rng(0)
    starts, total, scenes = [], 0.0, []
    for p in photos(200):
        if total >= seconds:
            break
        length = float(rng.choice([1.5, 3, 5, 8, 12]))
        starts.append(total)
        scenes.append((p, min(length, seconds - total)))
        total += length
    out, v = _encoder(path, x264_params)
    _write(out, v, (f for p, s in scenes for f in _pan(Image.open(p), s, rng)))
    return starts


def make_static(path: Path, seconds: float) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    base = np.asarray(Image.open(photos(1)[0]).convert("RGB").resize((W, H))).astype(np.int16)
    frames = (
        np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
        for _ in range(int(seconds * FPS))
    )
    out, v = _encoder(path)
    _write(out, v, frames)


def remux_longer(src: Path, dst: Path, minutes: float) -> None:
    """`src` repeated to `minutes` minutes by copying its packets (no decoding or encoding)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        length = round(float(inp.duration / 1e6) / s.time_base)
        for k in range(int(np.ceil(minutes * 60 / (inp.duration / 1e6)))):
            inp.seek(0)
            for packet in inp.demux(s):
                if packet.pts is None:
                    continue
                packet.pts += k * length
                packet.dts += k * length
                packet.stream = o
                out.mux(packet)


def shots(path: Path, keyframes: bool):
    from mmsearch.config import ImagePrep
    from mmsearch.loaders.video import Sampling, VideoInfo, iter_shots

    info = VideoInfo()
    started, cpu = time.perf_counter(), time.process_time()
    kept = list(iter_shots(path, ImagePrep(), Sampling(keyframes=keyframes), info=info))
    return time.perf_counter() - started, time.process_time() - cpu, kept, info


def peak_memory(path: Path) -> float:
    """MiB of peak resident memory of a fresh process that runs iter_shots over `path` (VmHWM:
    ru_maxrss would count the parent's memory from before the exec)."""
    code = (
        "import sys; from mmsearch.config import ImagePrep; "
        "from mmsearch.loaders.video import iter_shots; "
        "n = sum(1 for _ in iter_shots(sys.argv[1], ImagePrep(), time_budget_s=None)); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print(int(hwm.split()[1]) / 1024, n)"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    return float(out[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--long-minutes", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the image tower (0: torch's default, as the figures "
        "in RESULTS.md; the decoder uses FFmpeg's threads either way)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    require_datasets()
    OUT.mkdir(exist_ok=True)
    names = ("multi", "static", "gop30", "gop45")
    videos = {k: OUT / f"{k}-{args.seconds:g}s.mp4" for k in names}
    if not videos["multi"].exists():
        make_multi(videos["multi"], args.seconds)
    if not videos["static"].exists():
        make_static(videos["static"], args.seconds)
    for k in (30, 45):
        if not videos[f"gop{k}"].exists():
            make_multi(videos[f"gop{k}"], args.seconds, f"keyint={k}:min-keyint={k}:scenecut=0")

    import torch

    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders import create_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = create_encoder(
        ModelSpec.parse(str(random_model_dir())), EncoderOptions(device="cpu", precision="auto")
    )
    results = {"machine": machine(), "load": os.getloadavg()[0], "threads": torch.get_num_threads()}
    encoder.image.embed([np.zeros((224, 224, 3), np.uint8)] * 16, 16)  # warm-up
    for name, path in videos.items():
        results[name] = measure(encoder, path, args.repeat)
    if args.long_minutes:
        long = OUT / f"multi-{args.long_minutes:g}min.mp4"
        if not long.exists():
            remux_longer(videos["multi"], long, args.long_minutes)
        results["peak_rss_mib"] = {
            f"{args.seconds:g} s": round(peak_memory(videos["multi"]), 1),
            f"{args.long_minutes:g} min": round(peak_memory(long), 1),
        }
    results["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
        return
    report(results)


def measure(encoder, path: Path, repeat: int) -> dict:
    """Old and new loader (interleaved, best of `repeat`), the image tower on what each kept."""
    runs = {"old": [], "new": []}
    for _ in range(repeat):  # interleaved: the machine is shared and noisy
        for which in runs:
            runs[which].append(shots(path, keyframes=which == "new"))
    out = {}
    for which, done in runs.items():
        seconds, _, kept, info = min(done, key=lambda r: r[0])
        cpu = min(r[1] for r in done)
        towers, tower_cpu = [], []
        for _ in range(repeat):
            started, used = time.perf_counter(), time.process_time()
            encoder.image.embed([s.frame for s in kept], 16)
            towers.append(time.perf_counter() - started)
            tower_cpu.append(time.process_time() - used)
        out[which] = {
            "loader_s": round(seconds, 3),
            "loader_cpu_s": round(cpu, 3),
            "frames_decoded": info.frames,
            "kept": len(kept),
            "tower_on_kept_s": round(min(towers), 3),
            "tower_cpu_s": round(min(tower_cpu), 3),
            "ratio_loader_vs_tower": round(seconds / min(towers), 3),
            "cpu_ratio_loader_vs_tower": round(cpu / min(tower_cpu), 3),
            "shot_starts": [round(s.start, 2) for s in kept],
            "spans_decoded": info.spans,
        }
        out["seconds"] = round(info.duration, 1)
    out["keyframes"] = keyframe_seconds(path)
    out["new_vs_old_loader"] = round(out["new"]["loader_s"] / out["old"]["loader_s"], 3)
    return out


def keyframe_seconds(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sorted(
            round(float(p.pts * s.time_base), 2) for p in c.demux(s) if p.size and p.is_keyframe
        )


def report(results: dict) -> None:
    print(results["machine"], f"load {results['load']:.1f} -> {results['load_after']:.1f}")
    for name in ("multi", "static", "gop30", "gop45"):
        r = results[name]
        print(f"{name}: {r['seconds']} s, {len(r['keyframes'])} keyframes; new loader "
              f"{r['new_vs_old_loader']}x the old one's time")  # fmt: skip
        for which in ("old", "new"):
            x = r[which]
            print(
                f"  {which}: loader {x['loader_s']} s ({x['loader_cpu_s']} s CPU), "
                f"{x['frames_decoded']} frames decoded, {x['kept']} shots, image tower on them "
                f"{x['tower_on_kept_s']} s ({x['tower_cpu_s']} s CPU); loader / tower = "
                f"{x['ratio_loader_vs_tower']} wall, {x['cpu_ratio_loader_vs_tower']} CPU"
            )
            print(f"       shots at {x['shot_starts']}")
        print(f"  groups decoded inside (new): {r['new']['spans_decoded']}")
    if "peak_rss_mib" in results:
        print("peak RSS of iter_shots (MiB, VmHWM):", results["peak_rss_mib"])


if __name__ == "__main__":
    sys.exit(main())
