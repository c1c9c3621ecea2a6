"""Cold text search (a new `mmsearch search` process on a 10k-item index) vs `import torch, open_clip`.

    python benchmarks/bench_search_cold.py [--items 10000] [--runs 5]

The index is built with the ViT-B-32 architecture (random weights) through `index_paths` on a few
real photos, then padded to --items entries with synthetic catalog rows and vectors: a search's
cost depends on the number of vectors, not on where they came from.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, padded_index, require_datasets


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed: {out.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    require_datasets()

    from mmsearch.storage.collection import Collection

    work = Path(tempfile.mkdtemp(prefix="mmcold-"))
    root = padded_index(work, args.items)
    with Collection.open_reader(root, "default") as col:
        n, dim = col.vectors.ntotal, col.dim

    env = {**os.environ, "MMSEARCH_HOME": str(root)}
    # An installed package has its bytecode cached; this sandbox sets PYTHONDONTWRITEBYTECODE,
    # which would recompile every module on every start and measure that instead.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    exe = str(Path(sys.executable).with_name("mmsearch"))
    query = [exe, "search", "a dog running on the beach", "-k", "10"]
    timed(query, env)  # page cache warm, as for a user's second search of the day
    search_s = [timed(query, env) for _ in range(args.runs)]
    import_s = [timed([sys.executable, "-c", "import torch, open_clip"], env) for _ in range(3)]
    s, i = statistics.median(search_s), statistics.median(import_s)
    print(f"machine: {machine()}")
    print(f"index: {n} vectors of dim {dim} (ViT-B-32)")
    print(
        f"cold `mmsearch search TEXT`: median {s:.3f}s over {args.runs} runs "
        f"(min {min(search_s):.3f}, max {max(search_s):.3f})"
    )
    print(f"python -c 'import torch, open_clip': median {i:.3f}s")
    print(f"ratio search/import: {s / i:.3f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
