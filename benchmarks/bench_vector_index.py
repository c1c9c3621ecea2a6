"""Exact flat index vs the index mmsearch picks (IVF above 300k vectors), side by side.

    python benchmarks/bench_vector_index.py [--sizes 100000,1000000] [--dim 512]
                                            [--encodings auto|Flat,SQfp16,SQ8]

Synthetic clustered unit vectors (1,000 centres plus spread with a decaying spectrum, so nearest
neighbours are not trivially inside one cluster). For each size: build time (IVF: sampling,
k-means training, adding, the exact scan for tuning and the nprobe tuning, all as
`Collection.save_vectors` does them, minus the SQLite reads), file size, open time in a fresh
process (page cache warm, as for a CLI search shortly after another) with a plain read and with
the mmap flags readers use, single-query latency (median) unfiltered and with a 10% filter, and
recall@10 against the flat index on fresh queries (same distribution, not stored) and on fresh
queries shifted off the data as queries from another modality are (`mmsearch.storage.vectors.shifted`, with
another direction than the one tuning used).
The auto-picked index is built for every size, even below the threshold where mmsearch would stay
exact, to show what it would cost there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from common import clustered, machine

from mmsearch.storage.vectors import (
    FLAT,
    VectorIndex,
    build_ivf,
    choose_type,
    ivf_lists,
    shifted,
    tuning_sample,
)

OPEN_SCRIPT = textwrap.dedent(
    """
    import sys, time, numpy as np
    t0 = time.perf_counter()
    import faiss
    from mmsearch.storage.vectors import VectorIndex
    path, dim, mmap, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    q = np.load(sys.argv[5])
    t1 = time.perf_counter()
    vi = VectorIndex.load(path, dim, mmap=mmap, index_type=kind)
    t2 = time.perf_counter()
    vi.search(q[0], 10)
    t3 = time.perf_counter()
    rest = []
    for x in q[1:]:
        t = time.perf_counter(); vi.search(x, 10); rest.append(time.perf_counter() - t)
    print(t2 - t1, t3 - t2, sorted(rest)[len(rest) // 2])
    """
)


def batches(ids, x, size=65536):
    for s in range(0, len(ids), size):
        yield ids[s : s + size], x[s : s + size]


def build(index_type: str, ids, x) -> tuple[VectorIndex, float]:
    t = time.perf_counter()
    if index_type == FLAT:
        vi = VectorIndex(x.shape[1])
        for b in batches(ids, x):
            vi.add(*b)
        return vi, time.perf_counter() - t
    nlist = int(index_type[3:].partition(",")[0])
    query_rows, train_rows = tuning_sample(len(ids), nlist)
    vi = build_ivf(
        index_type,
        x.shape[1],
        batches(ids, x),
        (ids[query_rows], x[query_rows]),
        train=x[train_rows],
        n=len(ids),
    )
    return vi, time.perf_counter() - t


def cold_open(path: Path, dim: int, mmap: bool, kind: str, qfile: Path) -> tuple[float, ...]:
    """(open, first query, median later query) seconds in a fresh process, best of 3 opens."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = []
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", OPEN_SCRIPT, str(path), str(dim), str(int(mmap)), kind,
             str(qfile)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        runs.append(tuple(float(v) for v in out.stdout.split()))
    return min(runs)


def latency(vi: VectorIndex, queries, allowed=None) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        vi.search(q, 10, allowed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def recall(vi: VectorIndex, flat: VectorIndex, queries, allowed=None) -> float:
    hits = 0
    for q in queries:
        want = set(flat.search(q, 10, allowed)[1])
        hits += len(want & set(vi.search(q, 10, allowed)[1]))
    return hits / (10 * len(queries))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--encodings", default="auto", help="auto, or e.g. Flat,SQfp16,SQ8")
    ap.add_argument("--queries", type=int, default=300, help="fresh queries for recall")
    args = ap.parse_args()
    import faiss

    print(f"# {machine()}; faiss {faiss.__version__}; load average {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="mmvec-"))
    for n in [int(s) for s in args.sizes.split(",")]:
        dim = args.dim
        t = time.perf_counter()
        x = clustered(n, dim, seed=0)
        ids = np.arange(1, n + 1, dtype=np.int64)
        queries = clustered(args.queries, dim, seed=99)
        qfile = work / "q.npy"
        np.save(qfile, queries[:51])
        allowed = ids[np.random.default_rng(5).random(n) < 0.1]
        print(f"\n## n={n:,} x {dim} (data {time.perf_counter() - t:.1f}s)")
        auto = choose_type(n, dim, "ivf")
        types = [auto] if args.encodings == "auto" else [
            f"IVF{ivf_lists(n)},{e}" for e in args.encodings.split(",")
        ]  # fmt: skip
        flat, flat_build = build(FLAT, ids, x)
        flat_path = work / "flat.faiss"
        flat.save(flat_path)
        flat_lat = latency(flat, queries[:30])
        flat_lat_f = latency(flat, queries[:30], allowed)
        rows = [(FLAT, flat_build, flat_path, flat_lat, flat_lat_f, 1.0, 1.0, 1.0, None)]
        for kind in types:
            vi, secs = build(kind, ids, x)
            path = work / f"{kind.replace(',', '_')}.faiss"
            vi.save(path)
            lat = latency(vi, queries)
            lat_f = latency(vi, queries, allowed)
            rec = recall(vi, flat, queries)
            rec_s = recall(vi, flat, shifted(queries, seed=7))
            rec_f = recall(vi, flat, queries[:100], allowed)
            tuned = (vi.nprobe, vi.recall, vi.recall_shifted)
            rows.append((kind, secs, path, lat, lat_f, rec, rec_f, rec_s, tuned))
            del vi
        print(
            "| index | build s | file MB | open s (read / mmap) | first query s (read / mmap) "
            "| query ms (median) | 10%-filter query ms | recall@10 | 10%-filter recall@10 "
            "| shifted-query recall@10 | nprobe (tuned recall, shifted) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for kind, secs, path, lat, lat_f, rec, rec_f, rec_s, tuned in rows:
            plain = cold_open(path, dim, False, kind, qfile)
            mapped = cold_open(path, dim, True, kind, qfile)
            tuned_s = "-" if tuned is None else f"{tuned[0]} ({tuned[1]:.3f}, {tuned[2]:.3f})"
            print(
                f"| {kind} | {secs:.1f} | {path.stat().st_size / 1e6:.0f} | "
                f"{plain[0]:.3f} / {mapped[0]:.3f} | {plain[1]:.3f} / {mapped[1]:.3f} | "
                f"{lat * 1e3:.2f} | {lat_f * 1e3:.2f} | {rec:.3f} | {rec_f:.3f} | {rec_s:.3f} | "
                f"{tuned_s} |",
                flush=True,
            )
            if kind != FLAT:
                f = rows[0]
                print(
                    f"|   ratio flat/{kind} | {f[1] / secs:.2f} | "
                    f"{f[2].stat().st_size / path.stat().st_size:.2f} | | | "
                    f"{f[3] / lat:.0f}x | {f[4] / lat_f:.0f}x | | | | |"
                )
        for _, _, path, *_ in rows:
            path.unlink()
    print(f"\n# load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
