"""How faithful the video loader's kept-frame preparation is, and what it costs: the image tower's
embedding of a frame prepared three ways, on the frames of bench_video.py's test videos.

    HF_HUB_OFFLINE=1 python benchmarks/bench_video_prep.py --model /work/lit_model [--every 45]

  ffmpeg   the loader now (loaders.video._prepared): FFmpeg shrinks the frame to twice the
           tower's input (AREA), then resizes it bicubic to open_clip's size (swscale), crop in numpy
  pil      the loader before: the same shrink, then a PIL image and PIL's bicubic resize (photos'
           path, loaders.image.resize_crop)
  full     open_clip on the decoded frame: the whole frame as a PIL image, PIL's bicubic resize

Frames: every keyframe and every `--every`-th frame of each video (run bench_video.py first:
it writes the videos). Prints, per video, the minimum and mean cosine of ffmpeg and pil against
each other and against full, and the milliseconds per frame of each preparation (one thread).
A real model is needed (random weights say nothing about sensitivity): the offline LiT model
(README.txt beside it).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from common import OUT, machine

VIDEOS = ("multi", "static", "gop30", "gop45")


def frames(path, every: int):
    import av

    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if f.key_frame or i % every == 0:
                yield f


def preparations(prep):
    from av.video.reformatter import VideoReformatter

    from mmsearch.loaders.image import resize_crop
    from mmsearch.loaders.video import _prepared, _shown

    first, second, full = VideoReformatter(), VideoReformatter(), VideoReformatter()

    def shrunk(f):  # as iter_shots does (draft)
        scale = min(1.0, 2 * min(prep.size) / min(f.width, f.height))
        return max(1, round(f.width * scale)), max(1, round(f.height * scale))

    return {
        "ffmpeg": lambda f: _prepared(f, (first, second), *shrunk(f), prep),
        "pil": lambda f: resize_crop(_shown(f, first, *shrunk(f)), prep),
        "full": lambda f: resize_crop(_shown(f, full, f.width, f.height), prep),
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="an open_clip model (a real one)")
    ap.add_argument("--every", type=int, default=45, help="also every n-th frame")
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    import torch

    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders import create_encoder

    torch.set_num_threads(1)
    encoder = create_encoder(ModelSpec.parse(args.model), EncoderOptions(device="cpu"))
    ways = preparations(encoder.prep)
    print(machine(), "|", args.model, encoder.prep)
    pairs = (("ffmpeg", "pil"), ("ffmpeg", "full"), ("pil", "full"))
    worst = dict.fromkeys(pairs, 1.0)
    for name in VIDEOS:
        path = OUT / f"{name}-{args.seconds:g}s.mp4"
        if not path.exists():
            sys.exit(f"{path} missing: run bench_video.py first")
        inputs, spent = {w: [] for w in ways}, dict.fromkeys(ways, 0.0)
        for f in frames(path, args.every):
            for w, prepare in ways.items():
                started = time.process_time()
                inputs[w].append(prepare(f))
                spent[w] += time.process_time() - started
        n = len(inputs["full"])
        vectors = {w: np.asarray(encoder.image.embed(x, 32)) for w, x in inputs.items()}
        line = [f"{name}: {n} frames;"]
        for a, b in pairs:
            c = cosines(vectors[a], vectors[b])
            worst[(a, b)] = min(worst[(a, b)], float(c.min()))
            line.append(f"{a}~{b} min {c.min():.5f} mean {c.mean():.5f};")
        line.append(" ".join(f"{w} {spent[w] / n * 1000:.2f} ms" for w in ways))
        print(" ".join(line))
    print("all videos, min cosine:", {f"{a}~{b}": round(c, 5) for (a, b), c in worst.items()})


if __name__ == "__main__":
    main()
