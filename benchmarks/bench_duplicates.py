"""`mmsearch duplicates`: is the default rule right on real photos, and does it scale to 1M files?

1. Real photos (flickr8k_val1k, 1,000 photos ~200 px) embedded by the real weak aligned model of
   issue 10 (/work/lit_model: frozen EfficientNet-Lite0 + MiniLM, linear heads), through
   `mmsearch index` itself. Planted near-copies of 200 photos: a quality-35 re-encode, a
   60%-size quality-35 re-encode and a half-size quality-20 one. Look-alikes that must not be grouped: for 200 other photos a
   second "shot" (a 95% crop from one corner, scaled back: the camera moved a little), and for
   every photo its most similar other photo by the model (the hardest distinct pairs there are).
   Printed side by side: the cosine and the perceptual-hash distance of each kind of pair, which
   threshold separates them by vectors alone, by hashes alone, and by both (the default rule);
   then `find_duplicates` end to end: pair precision and recall against the planted groups.
2. Synthetic: n unit vectors (512-d) in scenes of ~5 (cosine 0.80 within a scene) with 1% of
   them given 1-3 planted near-copies (cosine 0.92-0.99). The exact pass and the k-means-cell
   pass side by side at 50k (time ratio, recall), the cell pass alone at 1M (time, peak memory
   above the vectors themselves, pair precision and recall). Each run is a child process, so
   its peak memory is its own.

    nice python benchmarks/bench_duplicates.py [--work /tmp/bench_dup] [--n 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import DATASETS, machine  # noqa: E402

LIT_MODEL = Path("/work/lit_model")
PLANTED, SHOTS = 200, 200
COPIES = ((1.0, 35), (0.6, 35), (0.5, 20))  # (scale, JPEG quality) of the planted re-encodes


def load() -> float:
    return os.getloadavg()[0]


# --- 1. real photos ---------------------------------------------------------------------------
def derive(photos: list[Path], out: Path, seed: int = 0) -> dict:
    """The planted files: {source: [q35, q35-60pct, q20-50pct]} for PLANTED photos, {source: shot} for
    SHOTS others; written once under `out`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    copies, shots = {}, {}
    out.mkdir(parents=True, exist_ok=True)
    for i in order[:PLANTED]:
        src = photos[i]
        img = Image.open(src).convert("RGB")
        made = []
        for scale, quality in COPIES:
            name = f"{src.stem}-q{quality}" + (f"-{round(scale * 100)}pct" if scale < 1 else "")
            made.append(out / f"{name}.jpg")
            if not made[-1].exists():
                size = (round(img.width * scale), round(img.height * scale))
                img.resize(size, Image.BICUBIC).save(made[-1], "JPEG", quality=quality)
        copies[src] = made
    for i in order[PLANTED : PLANTED + SHOTS]:
        src = photos[i]
        shot = out / f"{src.stem}-shot.jpg"
        if not shot.exists():
            img = Image.open(src).convert("RGB")
            w, h = img.size
            cw, ch = round(w * 0.95), round(h * 0.95)
            x0, y0 = int(rng.integers(0, 2)) * (w - cw), int(rng.integers(0, 2)) * (h - ch)
            img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC).save(
                shot, "JPEG", quality=90
            )
        shots[src] = shot
    return {"copies": copies, "shots": shots}


def quantiles(x) -> str:
    x = np.asarray(x, float)
    q = np.percentile(x, [0, 1, 5, 50, 95, 100])
    return "min {:.3f} | 1% {:.3f} | 5% {:.3f} | median {:.3f} | 95% {:.3f} | max {:.3f}".format(*q)


def photos_benchmark(work: Path, threads: int) -> dict:
    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec
    from mmsearch.loaders.phash import hamming
    from mmsearch.modalities import BY_NAME
    from mmsearch.pipeline.run import index_paths
    from mmsearch.search.duplicates import MAX_HASH_DISTANCE, find_duplicates, groups
    from mmsearch.storage.collection import Collection

    images = DATASETS / "flickr8k_val1k" / "images"
    photos = sorted(images.glob("*.jpg"))
    planted = derive(photos, work / "derived")
    root = work / "index"
    started = time.perf_counter()
    report = index_paths(
        IndexOptions(
            roots=(images, work / "derived"),
            name="dup",
            root_dir=root,
            encoder=EncoderOptions(model=ModelSpec.parse(str(LIT_MODEL)), device="cpu"),
            batch_size=32,
        )
    )
    print(
        f"indexed {report.files} photos ({report.added} new) in {time.perf_counter() - started:.0f} s"
    )
    with Collection.open_reader(root, "dup") as col:
        files, vectors = col.catalog.file_vectors(col.dim, "image")
        started = time.perf_counter()
        found = find_duplicates(col.catalog, col.dim, "image")
        seconds = time.perf_counter() - started
    row = {os.fsdecode(f[0]): i for i, f in enumerate(files)}
    hashes = np.array([f[5] for f in files], np.int64)

    def pairs(items):
        a = np.array([row[str(x)] for x, _ in items])
        b = np.array([row[str(y)] for _, y in items])
        return (vectors[a] * vectors[b]).sum(1), hamming(hashes[a], hashes[b])

    kinds = {
        **{
            f"re-encode q{quality}" + (f" at {round(scale * 100)}%" if scale < 1 else ""): [
                (s, c[i]) for s, c in planted["copies"].items()
            ]
            for i, (scale, quality) in enumerate(COPIES)
        },
        "another shot (95% crop)": list(planted["shots"].items()),
    }
    originals = np.array([row[str(p)] for p in photos])
    sims = vectors[originals] @ vectors[originals].T
    np.fill_diagonal(sims, -2)
    nearest = sims.argmax(1)
    kinds["nearest distinct photo"] = [(photos[i], photos[j]) for i, j in enumerate(nearest)]
    measured = {name: pairs(items) for name, items in kinds.items()}
    print("\npairs: cosine (LiT model) and perceptual-hash distance (bits of 64)")
    for name, (cos, ham) in measured.items():
        print(f"  {name:<26} n={len(cos):4d}  cosine  {quantiles(cos)}")
        print(f"  {'':<26}         hash    {quantiles(ham)}")

    positive = np.concatenate([measured[k][0] for k in list(kinds)[: len(COPIES)]])
    pos_ham = np.concatenate([measured[k][1] for k in list(kinds)[: len(COPIES)]])
    negatives = {k: measured[k] for k in list(kinds)[len(COPIES) :]}
    floor = BY_NAME["image"].duplicate_cosine
    rules = {}
    for t in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9):
        rules[f"vectors alone, cosine >= {t}"] = lambda c, h, t=t: c >= t
    for hmax in (2, 4, 5, 6, 8, 12):
        rules[f"hashes alone, <= {hmax} bits"] = lambda c, h, hmax=hmax: h <= hmax
    for t in (0.3, 0.4, 0.5, 0.6):
        for hmax in (4, 8):
            default = " (default)" if (t, hmax) == (floor, MAX_HASH_DISTANCE) else ""
            rules[f"both{default}: cosine >= {t}, hash <= {hmax}"] = lambda c, h, t=t, hmax=hmax: (
                (c >= t) & (h <= hmax)
            )
    print(
        "\nrule                                    copies found | look-alikes grouped: shots, nearest"
    )
    table = {}
    for name, rule in rules.items():
        recall = float(rule(positive, pos_ham).mean())
        wrong = {k: float(rule(c, h).mean()) for k, (c, h) in negatives.items()}
        table[name] = {"recall": recall, **wrong}
        print(
            f"  {name:<40} {recall:6.3f}       | {'  '.join(f'{v:6.3f}' for v in wrong.values())}"
        )

    truth = [{str(s), *map(str, c)} for s, c in planted["copies"].items()]
    got = [{os.fsdecode(f.path) for f in g.files} for g in found.groups]
    best_vec = max(
        (t for t in np.arange(0.5, 0.99, 0.01)),
        key=lambda t: _f1(truth, _vector_groups(groups, vectors, files, t)),
    )
    vec_groups = _vector_groups(groups, vectors, files, best_vec)
    end_to_end = {
        f"default rule (cosine >= {floor}, hash <= {MAX_HASH_DISTANCE})": _pair_scores(truth, got)
        | {"seconds": seconds},
        f"vectors alone, best threshold after the fact ({best_vec:.2f})": _pair_scores(
            truth, vec_groups
        ),
    }
    with Collection.open_reader(root, "dup") as col:
        for t, hmax in ((floor, 8), (0.3, MAX_HASH_DISTANCE), (0.5, MAX_HASH_DISTANCE),
                        (0.6, MAX_HASH_DISTANCE)):  # fmt: skip
            other = find_duplicates(col.catalog, col.dim, "image", t, hmax)
            got_other = [{os.fsdecode(f.path) for f in g.files} for g in other.groups]
            end_to_end[f"cosine >= {t}, hash <= {hmax}"] = _pair_scores(truth, got_other)
    print(f"\nfind_duplicates over {len(files)} photos, pairs within groups vs the planted groups:")
    for name, s in end_to_end.items():
        print(f"  {name:<58} precision {s['precision']:.3f}  recall {s['recall']:.3f}")
    return {"pairs": {k: {"cosine": quantiles(c), "hash": quantiles(h)} for k, (c, h) in measured.items()},
            "rules": table, "end_to_end": end_to_end}  # fmt: skip


def _vector_groups(groups, vectors, files, threshold) -> list[set[str]]:
    key = np.arange(len(files))
    return [{os.fsdecode(files[r][0]) for r in g.rows} for g in groups(vectors, threshold, key)]


def _pair_set(groups: list[set]) -> set[tuple]:
    return {tuple(sorted((a, b))) for g in groups for a in g for b in g if a < b}


def _pair_scores(truth: list[set], got: list[set]) -> dict:
    t, g = _pair_set(truth), _pair_set(got)
    hit = len(t & g)
    return {"precision": hit / max(len(g), 1), "recall": hit / max(len(t), 1), "pairs": len(g)}


def _f1(truth, got) -> float:
    s = _pair_scores(truth, got)
    return 2 * s["precision"] * s["recall"] / max(s["precision"] + s["recall"], 1e-9)


# --- 2. synthetic -----------------------------------------------------------------------------
DIM = 512
SMALL = 50_000  # where the exact pass runs beside the cell pass


def synthetic(n: int, path: Path, seed: int = 0) -> None:
    """n unit vectors: scenes of ~5 (within-scene cosine 0.80), 1% of rows originals with 1-3
    near-copies each (cosine uniform in 0.92-0.99), copies last; saved with their group labels
    (-1: no planted copy)."""
    rng = np.random.default_rng(seed)
    n_orig = n // 100
    counts = rng.integers(1, 4, n_orig)
    n_copies = int(counts.sum())
    n_base = n - n_copies
    x = np.lib.format.open_memmap(path, "w+", np.float32, (n, DIM))
    centres = rng.standard_normal((max(1, n_base // 5), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n_base, 65536):
        stop = min(start + 65536, n_base)
        x[start:stop] = _away(centres[rng.integers(0, len(centres), stop - start)], 0.5, rng)
    originals = rng.choice(n_base, n_orig, replace=False)
    source = np.repeat(originals, counts)
    cos = rng.uniform(0.92, 0.99, n_copies).astype(np.float32)
    x[n_base:] = _away(x[source], np.sqrt(1 / cos**2 - 1)[:, None], rng)
    x.flush()
    labels = np.full(n, -1, np.int64)
    labels[originals] = originals
    labels[n_base:] = source
    np.save(path.with_suffix(".labels.npy"), labels)


def _away(x: np.ndarray, amount, rng) -> np.ndarray:
    u = rng.standard_normal(x.shape).astype(np.float32)
    u -= (u * x).sum(1, keepdims=True) * x
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    out = x + amount * u
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def child(path: Path, mode: str, threshold: float) -> None:
    """One duplicates pass over saved vectors; prints one JSON line."""
    from mmsearch.search.duplicates import groups

    x = np.load(path)
    labels = np.load(path.with_suffix(".labels.npy"))
    rss = _status("VmRSS")
    exact_below = 10**12 if mode == "exact" else 0
    started = time.perf_counter()
    found = groups(x, threshold, np.arange(len(x)), exact_below=exact_below)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM") - rss
    # pairs within found groups vs within planted groups (counted, not listed: groups are small)
    truth = _pairs_per_label(labels)
    got = correct = 0
    for g in found:
        m = len(g.rows)
        got += m * (m - 1) // 2
        _, per = np.unique(labels[g.rows][labels[g.rows] >= 0], return_counts=True)
        correct += int((per * (per - 1) // 2).sum())
    print(json.dumps({"n": len(x), "mode": mode, "seconds": seconds, "peak_extra_bytes": peak,
                      "vectors_bytes": x.nbytes, "groups": len(found),
                      "precision": correct / max(got, 1), "recall": correct / max(truth, 1)}))  # fmt: skip


def _pairs_per_label(labels: np.ndarray) -> int:
    _, per = np.unique(labels[labels >= 0], return_counts=True)
    return int((per * (per - 1) // 2).sum())


def run_child(path: Path, mode: str, threshold: float) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), "--mode", mode, "--threshold", str(threshold)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_benchmark(work: Path, n_large: int, threshold: float) -> dict:
    results = {}
    for n, modes in ((SMALL, ("exact", "cells")), (n_large, ("cells",))):
        path = work / f"synthetic-{n}.npy"
        if not path.exists():
            started = time.perf_counter()
            synthetic(n, path)
            print(f"generated {n} vectors in {time.perf_counter() - started:.0f} s")
        for mode in modes:
            r = run_child(path, mode, threshold)
            results[f"{n}-{mode}"] = r
            print(
                f"  n={n:>8} {mode:<5} {r['seconds']:8.1f} s  peak memory above the vectors "
                f"{r['peak_extra_bytes'] / 2**20:7.0f} MiB (vectors {r['vectors_bytes'] / 2**20:.0f} MiB)"
                f"  precision {r['precision']:.4f}  recall {r['recall']:.4f}  (load {load():.1f})"
            )
    small_exact, small_cells = results[f"{SMALL}-exact"], results[f"{SMALL}-cells"]
    ratio = small_cells["seconds"] / small_exact["seconds"]
    large = results[f"{n_large}-cells"]
    estimate = small_exact["seconds"] * (n_large / SMALL) ** 2
    print(f"  at {SMALL}: cells/exact time {ratio:.3f}; at {n_large}: exact estimated (n^2) "
          f"{estimate:.0f} s vs cells {large['seconds']:.0f} s, ratio {large['seconds'] / estimate:.4f}")  # fmt: skip
    results["ratio_small"] = ratio
    results["exact_estimate_large_s"] = estimate
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_dup"))
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (large run)")
    parser.add_argument("--threshold", type=float, default=0.9, help="synthetic threshold")
    parser.add_argument("--threads", type=int, default=1, help="torch threads when embedding")
    parser.add_argument("--skip-photos", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="cells", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.mode, args.threshold)
        return
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{machine()}, load {load():.1f}")
    out = {"machine": machine()}
    if not args.skip_photos:
        if not (LIT_MODEL / "READY").exists():
            raise SystemExit(f"{LIT_MODEL} is not ready (see its README.txt)")
        out["photos"] = photos_benchmark(args.work, args.threads)
    if not args.skip_synthetic:
        print(f"\nsynthetic {DIM}-d vectors, threshold {args.threshold}:")
        out["synthetic"] = synthetic_benchmark(args.work, args.n, args.threshold)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
