"""End-to-end indexing rate vs the image encoder alone on pre-decoded inputs, in one run.

    python benchmarks/bench_index.py [--limit 1000] [--precision auto]

Indexes the real Flickr8k photos of ../shared/datasets/flickr8k_train2k with the ViT-B-32
architecture (random weights: same FLOPs as pretrained) through the library's `index_paths` (walk,
hash, decode in worker processes, encode, SQLite commits, FAISS), and separately times
`encoder.image.embed` on the same images decoded beforehand. Prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import DATASETS, machine, random_model_dir, require_datasets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    require_datasets()

    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec
    from mmsearch.encoders import create_encoder
    from mmsearch.indexer import index_paths
    from mmsearch.loaders.image import load_image

    src = sorted((DATASETS / "flickr8k_train2k" / "images").glob("*.jpg"))[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="mmbench-"))
    photos = work / "photos"
    photos.mkdir()
    for p in src:  # symlinks: the dataset stays read-only and is not copied
        os.symlink(p, photos / p.name)
    spec = ModelSpec.parse(str(random_model_dir("ViT-B-32")))
    enc_opts = EncoderOptions(model=spec, precision=args.precision)

    # Encoder alone, on images decoded beforehand.
    encoder = create_encoder(spec, enc_opts)
    prep = encoder.extras["prep"]
    arrays = [load_image(p, prep) for p in src]
    encoder.image.embed(arrays[: args.batch_size], args.batch_size)  # warm-up
    t = time.perf_counter()
    encoder.image.embed(arrays, args.batch_size)
    alone = len(arrays) / (time.perf_counter() - t)
    del encoder

    # The whole indexing pipeline.
    marks = {}

    def progress(stage, done, total):
        if stage == "embed" and done == 0:
            marks["start"] = time.perf_counter()
        marks["end"] = time.perf_counter()

    t0 = time.perf_counter()
    report = index_paths(
        IndexOptions(
            roots=(photos,),
            root_dir=work / "indexes",
            encoder=enc_opts,
            batch_size=args.batch_size,
            workers=args.workers,
        ),
        progress=progress,
    )
    wall = time.perf_counter() - t0
    pipeline = report.added / (marks["end"] - marks["start"])
    print(f"machine: {machine()}")
    print(
        f"images: {len(src)} Flickr8k JPEGs (224x224), ViT-B-32 random weights, "
        f"precision {args.precision}, batch {args.batch_size}"
    )
    print(f"encoder alone (pre-decoded):   {alone:7.1f} img/s")
    print(
        f"index_paths (decode+encode+db): {pipeline:7.1f} img/s  "
        f"(wall incl. model load and export: {wall:.1f}s, {report.added} added)"
    )
    print(f"ratio pipeline/encoder: {pipeline / alone:.3f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
