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


def index_collection(files: Path, work: Path, model: Path) -> Path:
    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec
    from mmsearch.indexer import index_paths

    root_dir = work / "indexes"
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
    print(f"indexed {report.files} files ({report.failed} failed) in {time.perf_counter() - t:.0f}s")
    return root_dir


def units(searcher, scene_of: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every unit of the index: ids, vectors, modality names, scene numbers."""
    cat = searcher.col.catalog
    ids, vecs = cat.all_vectors(searcher.col.dim)
    rows = cat.units(ids)
    mods = np.array([rows[int(i)].modality for i in ids])
    scene = np.array([scene_of[rows[int(i)].path] for i in ids])
    return ids, vecs, mods, scene


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
