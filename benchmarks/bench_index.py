"""End-to-end indexing rate vs its bound (the image encoder alone on pre-decoded inputs), and the
cost of time-bounded commits, measured interleaved in one run.

    python benchmarks/bench_index.py [--limit 200] [--rounds 3] [--precision auto] [--threads N]

Indexes real Flickr8k photos (../shared/datasets/flickr8k_train2k, 224x224 JPEGs) with the ViT-B-32
architecture (random weights: same FLOPs as pretrained) through the library's `index_paths` (walk,
hash, decode in worker processes, encode, SQLite commits, FAISS), and times `encoder.image.embed`
on the same images decoded beforehand.

These machines are shared and noisy, so the two are measured A B A B (`--rounds` of each, after
one untimed warm round of each), with the same precision (`auto` is resolved once and the result
passed to both) and the same torch thread count, and medians are compared. A ratio above 1 means
the measurement, not the pipeline, is off (an earlier version timed one encoder pass and one
pipeline pass minutes apart and printed 1.218 on a loaded machine).

Time-bounded commits: where `IndexOptions` has `commit_seconds` (commit at most every ~N s of work
besides every `commit_every` files), `index_paths` runs with commit_seconds=None (count only), 10
and 2, interleaved, and their files/s are compared. Without that field the comparison is skipped
with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import DATASETS, machine, random_model_dir, require_datasets


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "?"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ",".join(f for f in wanted if f" {f}" in flags) or "none of avx2/avx512"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200, help="photos per timed pass")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of each measurement")
    ap.add_argument("--precision", default="auto", help="auto (resolved once), fp32 or bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--commit-seconds",
        default="10,2",
        help="commit_seconds values to compare against None (comma-separated; '' to skip)",
    )
    args = ap.parse_args()
    require_datasets()

    import torch

    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec
    from mmsearch.encoders import create_encoder
    from mmsearch.encoders.clip import pick_dtype
    from mmsearch.loaders.image import load_image
    from mmsearch.pipeline.commit import default_workers
    from mmsearch.pipeline.run import index_paths

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    precision = args.precision
    if precision == "auto":
        dtype = pick_dtype("cpu", "auto")
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    src = sorted((DATASETS / "flickr8k_train2k" / "images").glob("*.jpg"))[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="mmbench-"))
    photos = work / "photos"
    photos.mkdir()
    for p in src:  # symlinks: the dataset stays read-only and is not copied
        os.symlink(p, photos / p.name)
    warm_dir = work / "warm"
    warm_dir.mkdir()
    for p in src[: 2 * args.batch_size]:
        os.symlink(p, warm_dir / p.name)
    spec = ModelSpec.parse(str(random_model_dir("ViT-B-32")))
    enc_opts = EncoderOptions(model=spec, device="cpu", precision=precision)
    workers = default_workers() if args.workers is None else args.workers
    root_dir = work / "indexes"  # shared, so the query-tower export is done once (warm round)

    encoder = create_encoder(spec, enc_opts)
    prep = encoder.prep
    arrays = [load_image(p, prep) for p in src]

    def alone() -> float:
        t = time.perf_counter()
        encoder.image.embed(arrays, args.batch_size)
        return len(arrays) / (time.perf_counter() - t)

    runs = {"n": 0}
    # Time inside catalog commits (the direct cost of committing more often; unlike files/s it
    # does not drift with the machine's load): wrap Catalog.transaction.
    from mmsearch.storage import catalog as store

    commits = {"n": 0, "s": 0.0}
    plain_transaction = store.Catalog.transaction

    @contextlib.contextmanager
    def timed_transaction(self):
        t = time.perf_counter()
        with plain_transaction(self):
            yield
        commits["n"] += 1
        commits["s"] += time.perf_counter() - t

    store.Catalog.transaction = timed_transaction

    def pipeline(folder: Path = photos, **extra) -> float:
        """files/s from the first to the last embed tick (model load and the final vector save
        are outside the window; hashing, decoding, encoding and every commit are inside)."""
        marks = {}

        def progress(stage, done, total):
            if stage == "embed":
                now = time.perf_counter()
                marks.setdefault("start", now)
                marks["end"] = now

        runs["n"] += 1
        commits.update(n=0, s=0.0)
        report = index_paths(
            IndexOptions(
                roots=(folder,),
                name=f"run{runs['n']}",
                root_dir=root_dir,
                encoder=enc_opts,
                batch_size=args.batch_size,
                workers=workers,
                **extra,
            ),
            progress=progress,
        )
        shutil.rmtree(root_dir / f"run{runs['n']}")
        window = marks["end"] - marks["start"]
        commits["share"] = commits["s"] / window
        return report.added / window

    print(f"machine: {machine()}; cpu flags: {cpu_flags()}")
    print(
        f"images: {len(src)} Flickr8k JPEGs (224x224), ViT-B-32 random weights, precision "
        f"{precision} (asked {args.precision}), torch threads {threads}, batch {args.batch_size}, "
        f"decode workers {workers}, {args.rounds} rounds after a warm one",
        flush=True,
    )
    t0 = time.perf_counter()

    # Warm: one untimed pass of each (kernels, page cache, the query-tower export).
    encoder.image.embed(arrays[: 2 * args.batch_size], args.batch_size)
    pipeline(warm_dir)

    # The bound and the pipeline, A B A B.
    a, b = [], []
    for r in range(args.rounds):
        a.append(alone())
        b.append(pipeline())
        print(f"  round {r + 1}: encoder alone {a[-1]:6.2f} img/s, index_paths {b[-1]:6.2f} img/s")
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"encoder alone (pre-decoded):    median {ma:7.2f} img/s  (runs {_fmt(a)})")
    print(f"index_paths (decode+encode+db): median {mb:7.2f} img/s  (runs {_fmt(b)})")
    print(
        f"ratio pipeline/encoder: {mb / ma:.3f} (per round: "
        f"{', '.join(f'{y / x:.3f}' for x, y in zip(a, b, strict=True))})",
        flush=True,
    )

    values = [float(v) for v in args.commit_seconds.split(",") if v.strip()]
    if values:
        compare_commit_seconds(values, args.rounds, pipeline, commits)
    print(f"total wall {time.perf_counter() - t0:.0f}s")
    shutil.rmtree(work)


def compare_commit_seconds(values: list[float], rounds: int, pipeline, commits: dict) -> None:
    """Time-bounded commits: the same pipeline with commit_seconds None vs each of `values`,
    interleaved (rotated each round so no setting always runs first)."""
    settings = [None, *values]
    rates = {s: [] for s in settings}
    spent = {s: [] for s in settings}  # (commits, seconds in them, share of the window)
    for r in range(rounds):
        order = settings[r % len(settings) :] + settings[: r % len(settings)]
        for s in order:
            rates[s].append(pipeline(commit_seconds=s))
            spent[s].append((commits["n"], commits["s"], commits["share"]))
        print("  round " + str(r + 1) + ": " + ", ".join(
            f"commit_seconds={s}: {rates[s][-1]:6.2f} files/s" for s in settings
        ), flush=True)  # fmt: skip
    base = statistics.median(rates[None])
    for s in settings:
        m = statistics.median(rates[s])
        n, secs, share = (statistics.median(x) for x in zip(*spent[s], strict=True))
        print(
            f"index_paths commit_seconds={s!s:>5}: median {m:7.2f} files/s "
            f"(runs {_fmt(rates[s])}), ratio to None {m / base:.3f}; "
            f"{n:.0f} commits taking {secs * 1000:.0f} ms, {share:.2%} of the run"
        )


def _fmt(xs) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    main()
