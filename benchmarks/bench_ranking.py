"""Ranking across modalities and "nothing found": raw cosine vs reciprocal rank fusion vs the
index's calibrated relevance, on a mixed collection indexed through the library.

Collection, from flickr8k_val1k (scenes shuffled with a fixed seed): photos of scenes 0..P-1, and
one-line notes holding another caption (caption 1) of scenes P/2..P/2+N-1, so half the notes
describe a photographed scene and half describe scenes with no photo. Queries: caption 0 of every
scene with a photo or a note. Relevant = the same scene (its photo and its note).

1. `--type any` recall@10 of same-scene items, as a ratio to an oracle that merges the per-type
   top-10 lists perfectly (every relevant item in either list, up to 10), for raw cosine (what
   `--type any` did), reciprocal rank fusion of the per-type lists (k=60), and relevance.
2. Absent concepts: 30 queries about things not in Flickr8k (food, machines, wild animals) against
   the present queries (caption 0 of a photographed scene): at each --min-relevance P, the share of
   absent queries answered with nothing (`--type any`) and the share of present queries whose
   photo is still among the hits (`--type any -k 10`); beside it the best single raw-cosine cut,
   chosen after the fact.

Needs the LiT model of benchmarks/bench_lit.py (the `head` stage; see /work/lit_model/README.txt):

    python benchmarks/bench_ranking.py --model /work/lit_model [--work /tmp/bench_ranking]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import DATASETS, machine, require_datasets  # noqa: E402

ABSENT = [
    # food
    "a bowl of ramen noodles with chopsticks", "sushi rolls on a wooden plate",
    "a stack of pancakes with maple syrup", "a green salad with tomatoes and cucumbers",
    "a bowl of tomato soup", "a plate of spaghetti with meatballs",
    "a ham and cheese sandwich cut in half", "a bunch of ripe bananas",
    "a tray of chocolate chip cookies", "a basket of fresh fruit",
    # machines
    "an old typewriter on a desk", "a washing machine in a laundry room",
    "a microwave oven in a kitchen", "a vacuum cleaner on a carpet",
    "an excavator digging at a construction site", "a bulldozer pushing dirt",
    "a jet airplane taking off from a runway", "a computer keyboard and a printer",
    "a server rack in a data center", "a sewing machine with a spool of thread",
    # wild animals
    "a giraffe eating leaves from a tree", "an elephant spraying water with its trunk",
    "a lion resting in the tall grass", "a tiger walking through the jungle",
    "penguins standing on the ice", "a kangaroo in the outback",
    "a polar bear on an ice floe", "a shark swimming underwater",
    "a camel in the desert", "a rhinoceros grazing on the savanna",
]  # fmt: skip
K = 10
RRF_K = 60


def scenes(seed: int = 0) -> list[tuple[Path, list[str]]]:
    """(photo, its 5 captions) per val1k scene, in a seeded shuffled order."""
    root = DATASETS / "flickr8k_val1k"
    by_photo: dict[str, list[str]] = {}
    with open(root / "manifest.csv", newline="") as f:
        for r in csv.DictReader(f):
            by_photo.setdefault(r["path"], []).append(r["text"].strip())
    out = [(root / p, caps) for p, caps in sorted(by_photo.items())]
    random.Random(seed).shuffle(out)
    return out


def build_collection(files: Path, all_scenes, n_photos: int, n_notes: int) -> dict:
    """Photos and notes on disk; returns {path bytes: scene number}."""
    shutil.rmtree(files, ignore_errors=True)
    (files / "photos").mkdir(parents=True)
    (files / "notes").mkdir()
    scene_of = {}
    for s in range(n_photos):
        dst = files / "photos" / all_scenes[s][0].name
        shutil.copyfile(all_scenes[s][0], dst)
        scene_of[os.fsencode(dst.resolve())] = s
    for s in range(n_photos // 2, n_photos // 2 + n_notes):
        dst = files / "notes" / f"scene-{s:04d}.txt"
        dst.write_text(all_scenes[s][1][1] + "\n")
        scene_of[os.fsencode(dst.resolve())] = s
    return scene_of


def index_collection(files: Path, work: Path, model: Path, reuse: bool) -> Path:
    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec
    from mmsearch.pipeline.run import index_paths

    root_dir = work / "indexes"
    if reuse and (root_dir / "mixed" / "manifest.json").is_file():
        return root_dir
    shutil.rmtree(root_dir, ignore_errors=True)
    t = time.perf_counter()
    report = index_paths(
        IndexOptions(
            roots=(files,),
            name="mixed",
            root_dir=root_dir,
            encoder=EncoderOptions(model=ModelSpec.parse(str(model)), device="cpu"),
        )
    )
    took = time.perf_counter() - t
    print(
        f"indexed {report.files} files ({report.failed} failed) in {took:.0f}s (relevance fitted)"
    )
    return root_dir


def units(searcher, scene_of: dict) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Every unit of the index: {path: column}, vectors, modality names, scene numbers."""
    cat = searcher.col.catalog
    ids, vecs = cat.all_vectors(searcher.col.dim)
    rows = [cat.units(ids)[int(i)] for i in ids]
    mods = np.array([r.modality for r in rows])
    scene = np.array([scene_of[r.path] for r in rows])
    return {r.path: j for j, r in enumerate(rows)}, vecs, mods, scene


# --- the rankings compared -------------------------------------------------------------------
def per_type_ranks(scores: np.ndarray, mods: np.ndarray) -> np.ndarray:
    """1-based rank of each unit among the units of its own modality, per query row."""
    ranks = np.zeros(scores.shape, dtype=np.int64)
    for m in np.unique(mods):
        cols = np.flatnonzero(mods == m)
        order = np.argsort(-scores[:, cols], axis=1, kind="stable")
        r = np.empty_like(order)
        np.put_along_axis(r, order, np.arange(1, len(cols) + 1)[None, :], axis=1)
        ranks[:, cols] = r
    return ranks


def recall_at_k(order_key: np.ndarray, relevant: np.ndarray, k: int = K) -> np.ndarray:
    """Per query: the share of its relevant units among the k with the largest `order_key`."""
    top = np.argsort(-order_key, axis=1, kind="stable")[:, :k]
    found = np.take_along_axis(relevant, top, axis=1).sum(1)
    return found / relevant.sum(1)


def oracle_recall(ranks: np.ndarray, relevant: np.ndarray, k: int = K) -> np.ndarray:
    """A perfect merge of the per-type top-k lists: every relevant unit in either, up to k."""
    in_lists = (relevant & (ranks <= k)).sum(1)
    return np.minimum(in_lists, k) / relevant.sum(1)


def calibrated(searcher, queries: list[str], col_of: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """`--type any -k K` through the library, per query: its hits as unit columns (`col_of`:
    path -> column; one unit per file here), in rank order, and their relevance; and the mean
    seconds per search."""
    cols = np.full((len(queries), K), -1)
    rel = np.full((len(queries), K), np.nan)
    t = time.perf_counter()
    for i, text in enumerate(queries):
        for j, hit in enumerate(searcher.search(text, k=K, modality="any")):
            cols[i, j], rel[i, j] = col_of[hit.path], hit.relevance
    return cols, rel, (time.perf_counter() - t) / len(queries)


def recall_of_lists(cols: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    found = np.array([relevant[i, c[c >= 0]].sum() for i, c in enumerate(cols)])
    return found / relevant.sum(1)


def absent_curve(levels, top_absent: np.ndarray, photo_value: np.ndarray, photo_listed):
    """Per level: share of absent queries with nothing at or above it; share of present
    queries whose photo (listed in their unfiltered top K) stays."""
    return [((top_absent < p).mean(), (photo_value[photo_listed] >= p).mean()) for p in levels]


def run(args, name: str, files: Path, scene_of: dict, queries: list[str]):
    """Index `files` as `name`; the unit table, query vectors and calibrated results."""
    from mmsearch.config import SearchOptions
    from mmsearch.search import Searcher

    root = index_collection(files, args.work / name, args.model.resolve(), args.reuse)
    with Searcher(SearchOptions(name="mixed", root_dir=root, device="cpu")) as searcher:
        col_of, vecs, mods, scene = units(searcher, scene_of)
        qv = searcher.embed_texts(queries)
        cols, rel, per_query = calibrated(searcher, queries, col_of)
        probes = searcher.calibration(sorted(set(mods))).probes
    return dict(scores=qv @ vecs.T, mods=mods, scene=scene, cols=cols, rel=rel,
                per_query=per_query, probes=probes)  # fmt: skip


def ranking_table(r: dict, n_scenes: int) -> None:
    scores, relevant = r["scores"][:n_scenes], r["scene"][None, :] == np.arange(n_scenes)[:, None]
    ranks = per_type_ranks(scores, r["mods"])
    oracle = oracle_recall(ranks, relevant).mean()
    rows = {
        "raw cosine (--type any before)": recall_at_k(scores, relevant).mean(),
        f"reciprocal rank fusion (k={RRF_K})": recall_at_k(1.0 / (RRF_K + ranks), relevant).mean(),
        "calibrated relevance (this)": recall_of_lists(r["cols"][:n_scenes], relevant).mean(),
    }
    print(f"| --type any, recall@{K} of same-scene items | recall | / oracle |\n|---|---|---|")
    print(f"| oracle merge of the per-type top-{K} lists | {oracle:.3f} | 1 |")
    for name, x in rows.items():
        print(f"| {name} | {x:.3f} | **{x / oracle:.3f}** |")
    print(f"mean seconds per calibrated search (query embedding included): {r['per_query']:.3f}")


def absent_table(r: dict, n_photos: int, n_scenes: int) -> None:
    """The present queries are the first `n_photos` (their photo is scene i's), the absent
    ones follow the `n_scenes` present ones."""
    scores, cols, rel = r["scores"], r["cols"], r["rel"]
    is_image = r["mods"] == "image"
    photo = np.array([np.flatnonzero((r["scene"] == s) & is_image)[0] for s in range(n_photos)])
    listed = (cols[:n_photos] == photo[:, None]).any(1)
    photo_rel = np.array(
        [rel[i][cols[i] == photo[i]][0] if listed[i] else -1.0 for i in range(n_photos)]
    )
    levels = np.round(np.arange(0.1, 1.0, 0.1), 2)
    ours = absent_curve(levels, np.nan_to_num(rel[n_scenes:, 0], nan=-1.0), photo_rel, listed)
    # raw cosine: today's --type any top K, and one cut on the cosine
    raw_listed = (np.argsort(-scores, axis=1)[:n_photos, :K] == photo[:, None]).any(1)
    raw_photo = scores[np.arange(n_photos), photo]
    cuts = np.round(np.arange(0.20, 0.80, 0.01), 2)
    raw = absent_curve(cuts, scores[n_scenes:].max(1), raw_photo, raw_listed)
    best = max(range(len(cuts)), key=lambda i: min(raw[i]))
    print(
        f"{len(ABSENT)} absent queries; {n_photos} present queries, {listed.sum()} with their "
        f"photo in the --type any top {K} (raw cosine: {raw_listed.sum()})"
    )
    print("| --min-relevance | absent: nothing | present: photo kept |\n|---|---|---|")
    for p, (a, k) in zip(levels, ours, strict=True):
        b = "**" if p == 0.5 else ""
        print(f"| {b}{p:.1f}{b} | {b}{a:.2f}{b} | {b}{k:.2f}{b} |")
    print(
        f"best single raw-cosine cut, chosen after the fact: {cuts[best]:.2f} -> absent "
        f"{raw[best][0]:.2f}, present {raw[best][1]:.2f}; raw-cosine curve (cut: absent/present): "
        + ", ".join(
            f"{c:.2f}: {a:.2f}/{k:.2f}" for c, (a, k) in zip(cuts[::5], raw[::5], strict=True)
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("/work/lit_model"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_ranking"))
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--notes", type=int, default=300)
    ap.add_argument("--reuse", action="store_true", help="keep the work dir's indexes")
    ap.add_argument(
        "--photos-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the absent-concept curve on the photos alone (text probes: the shipped list)",
    )
    args = ap.parse_args()
    require_datasets()
    import torch

    torch.set_num_threads(1)
    print(machine(), f"load average {os.getloadavg()[0]:.1f}")
    all_scenes = scenes()
    n_scenes = args.photos // 2 + args.notes
    present = [all_scenes[s][1][0] for s in range(n_scenes)]
    scene_of = build_collection(args.work / "files", all_scenes, args.photos, args.notes)
    r = run(args, "mixed", args.work / "files", scene_of, present + ABSENT)
    print(
        f"\n## {args.photos} photos + {args.notes} notes ({args.notes // 2} of photographed "
        f"scenes), {n_scenes} queries; relevance probes: {r['probes']}"
    )
    ranking_table(r, n_scenes)
    print()
    absent_table(r, args.photos, n_scenes)
    if args.photos_only:
        photos = {p: s for p, s in scene_of.items() if b"/photos/" in p}
        r = run(args, "photos", args.work / "files" / "photos", photos,
                present[: args.photos] + ABSENT)  # fmt: skip
        print(f"\n## the {args.photos} photos alone; relevance probes: {r['probes']}")
        absent_table(r, args.photos, args.photos)


if __name__ == "__main__":
    main()
