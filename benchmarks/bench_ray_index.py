"""Indexing on Ray vs the local pipeline, side by side in one run, on the same photos and cores.

    python benchmarks/bench_ray_index.py [--limit 300] [--actors 2]

Indexes Flickr8k photos (../shared/datasets/flickr8k_train2k, symlinked, not copied) with a
random-weight ViT-B-32 twice: the local pipeline (`index_paths`, decoding worker processes + the
encoder in this process) and `index_paths` with `RaySettings(address="local")` (a Ray instance
started here; Ray Data actors hash, decode and embed; this process commits). Prints the embedding
rates (embedding stage start to last commit; on Ray that includes starting the actors), the walls,
and the ratio. Run it on a quiet machine: under load from other jobs, two single-threaded actor
processes get a larger share of the CPU than one two-threaded process, which flatters Ray.
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
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    require_datasets()

    import ray

    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, RaySettings
    from mmsearch.pipeline.run import index_paths

    src = sorted((DATASETS / "flickr8k_train2k" / "images").glob("*.jpg"))[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="mmbench-ray-"))
    photos = work / "photos"
    photos.mkdir()
    for p in src:
        os.symlink(p, photos / p.name)
    spec = ModelSpec.parse(str(random_model_dir("ViT-B-32")))
    load = os.getloadavg()[0]

    def run(name: str, ray_settings):
        marks = {}

        def progress(stage, done, total):
            if stage == "embed" and done == 0:
                marks["start"] = time.perf_counter()
            if stage == "embed" and done > 0 and "first" not in marks:
                marks["first"] = time.perf_counter()
            if stage == "embed":
                marks["end"] = (time.perf_counter(), done)

        t0 = time.perf_counter()
        report = index_paths(
            IndexOptions(
                roots=(photos,), name=name, root_dir=work / "indexes",
                encoder=EncoderOptions(model=spec, precision="fp32"),
                batch_size=args.batch_size, commit_every=64, ray=ray_settings,
            ),
            progress=progress,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        end, done = marks["end"]
        # embedding rate from the start of the embedding stage (after the driver's model load;
        # on Ray this includes starting the actors and their model loads) to the last commit
        rate = done / (end - marks["start"])
        return report, rate, wall

    local, local_rate, local_wall = run("local", None)
    t = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_start = time.perf_counter() - t
    remote, ray_rate, ray_wall = run(
        "ray", RaySettings(address="auto", actors=args.actors, files_per_batch=args.batch_size)
    )
    ray.shutdown()
    assert remote.added == local.added == len(src), (remote.added, local.added)

    print(f"machine: {machine()}; load average at start {load:.1f}")
    print(f"{len(src)} Flickr8k photos, ViT-B-32 random weights, fp32, batch {args.batch_size}")
    print(f"local pipeline:        {local_rate:6.1f} img/s  (wall {local_wall:.1f}s)")
    print(
        f"Ray, {args.actors} actor(s):      {ray_rate:6.1f} img/s  (wall {ray_wall:.1f}s, "
        f"plus {ray_start:.1f}s to start Ray)"
    )
    print(f"ratio Ray/local: {ray_rate / local_rate:.3f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
