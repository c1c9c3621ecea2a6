"""Cold text search (a new `mmsearch search` process on a 10k-item index) vs `import torch, open_clip`,
for each kind of text tower, side by side in one run; and the fidelity of each exported tower.

    python benchmarks/bench_search_cold.py [--items 10000] [--runs 5] [--lit /work/lit_model]

Indexes: ViT-B-32 (random weights; open_clip's own text transformer) and, with --lit, a model
whose text tower is a Hugging Face encoder (the LiT model: MiniLM, mean pooling, linear head;
loaded with HF_HUB_OFFLINE=1). Each is built through `index_paths` on a few real photos, then
padded to --items entries with synthetic catalog rows and vectors: a search's cost depends on the
number of vectors, not on where they came from.

Fidelity: flickr8k_val1k captions embedded by the exported tower (what searches use) and by the
torch model, scored against the indexed photos: max |score difference| and max |difference| of
the normalised vectors.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATASETS, machine, padded_index, require_datasets

PHOTOS = 20


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed: {out.stderr}")
    return elapsed


def cold_search(root: Path, runs: int) -> list[float]:
    env = {**os.environ, "MMSEARCH_HOME": str(root), "HF_HUB_OFFLINE": "1"}
    # An installed package has its bytecode cached; this sandbox sets PYTHONDONTWRITEBYTECODE,
    # which would recompile every module on every start and measure that instead.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    exe = str(Path(sys.executable).with_name("mmsearch"))
    query = [exe, "search", "a dog running on the beach", "-k", "10"]
    timed(query, env)  # page cache warm, as for a user's second search of the day
    return [timed(query, env) for _ in range(runs)]


def fidelity(root: Path, captions: int) -> tuple[float, float, str]:
    """(max |score diff|, max |vector diff|, tower kind) of the exported text tower against the
    torch model on `captions` flickr8k_val1k captions, scored against the indexed photos."""
    import numpy as np
    import torch

    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders import create_encoder, query_text_tower
    from mmsearch.storage.collection import Collection
    from mmsearch.storage.layout import model_cache_dir

    torch.set_num_threads(1)
    with open(DATASETS / "flickr8k_val1k" / "manifest.csv", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)][:captions]
    with Collection.open_reader(root, "default") as col:
        identity = col.encoder_identity
        tower = query_text_tower(model_cache_dir(col.root_dir, identity["key"]))
        ids = col.catalog.unit_ids()[:PHOTOS]  # the real photos, indexed before the padding
        items = col.catalog.vectors_of(ids, col.dim)
    if tower is None:
        raise SystemExit("no exported text tower: the index searches with torch")
    enc = create_encoder(
        ModelSpec.parse(identity["spec"]), EncoderOptions(device="cpu", precision="fp32")
    )
    ref, got = enc.encode_text(texts), tower.embed(texts)
    scores = float(np.abs(got @ items.T - ref @ items.T).max())
    return scores, float(np.abs(got - ref).max()), type(tower).__name__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lit", default="/work/lit_model", help="HF-text-tower model ('' to skip)")
    ap.add_argument("--captions", type=int, default=500)
    args = ap.parse_args()
    require_datasets()
    os.environ["HF_HUB_OFFLINE"] = "1"

    from mmsearch.storage.collection import Collection

    models = {"ViT-B-32 (random)": None}
    if args.lit:
        models["LiT MiniLM (HF text tower)"] = args.lit
    work = Path(tempfile.mkdtemp(prefix="mmcold-"))
    rows = []
    for name, model in models.items():
        root = padded_index(work / str(len(rows)), args.items, PHOTOS, model)
        with Collection.open_reader(root, "default") as col:
            n, dim = col.vectors.ntotal, col.dim
        rows.append((name, n, dim, cold_search(root, args.runs), root))
    env = {**os.environ}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    import_s = [timed([sys.executable, "-c", "import torch, open_clip"], env) for _ in range(3)]
    i = statistics.median(import_s)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"machine: {machine()}; load average after the timed runs: {load}")
    print(f"python -c 'import torch, open_clip': median {i:.3f}s over 3 runs")
    for name, n, dim, search_s, root in rows:
        s = statistics.median(search_s)
        score_diff, vec_diff, kind = fidelity(root, args.captions)
        print(
            f"{name}: {n} vectors of dim {dim}; cold `mmsearch search TEXT` median {s:.3f}s over "
            f"{args.runs} runs (min {min(search_s):.3f}, max {max(search_s):.3f}); "
            f"ratio search/import {s / i:.3f}; {kind} vs torch on {args.captions} captions: "
            f"max |score diff| {score_diff:.2e}, max |vector diff| {vec_diff:.2e}"
        )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
