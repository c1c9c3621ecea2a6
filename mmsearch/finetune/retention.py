"""A retention set when the user names none: what the base model finds in the user's own index.

For each shipped generic query (`data/probe_queries.txt`: common photo subjects and settings),
the base model's best photo among up to `LIMIT` indexed photos (not trained on, not held out)
becomes its pair, each photo used once (the queries with the most confident best photo first).
At the base model these pairs are found by construction; a fine-tuned model that loses them has
changed what the user's everyday searches return. It measures drift from the base model on the
user's photos, not correctness against human captions: `--retain PAIRS` is the stronger check.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import MMSearchError
from ..records import IMAGE
from .pairs import Pair, PairSet

LIMIT = 256


def indexed_photos(root_dir: Path, name: str, exclude: set, limit: int = LIMIT, seed: int = 0):
    """Up to `limit` photos of index `name` that exist and are not in `exclude` (seeded draw);
    [] when there is no such index."""
    from ..storage.collection import Collection

    try:
        col = Collection.open_reader(Path(root_dir), name)
    except MMSearchError:
        return []
    with col:
        rows = col.catalog.files_under([b"/"]) if col.catalog is not None else {}
    paths = sorted(Path(os.fsdecode(p)) for p, r in rows.items() if r.modality == IMAGE)
    paths = [p for p in paths if p not in exclude and p.is_file()]
    if len(paths) > limit:
        pick = np.random.default_rng(seed).choice(len(paths), limit, replace=False)
        paths = [paths[i] for i in sorted(pick)]
    return paths


def base_model_pairs(image_emb: np.ndarray, text_emb: np.ndarray) -> list[tuple[int, int]]:
    """(query, photo) pairs: each query's best photo, each photo once, the most confident
    queries first. Embeddings L2-normalised."""
    sims = text_emb @ image_emb.T
    best = sims.max(1)
    used, out = set(), []
    for q in np.argsort(-best, kind="stable"):
        for i in np.argsort(-sims[q], kind="stable"):
            if int(i) not in used:
                if sims[q, i] >= best[q]:  # only the query's own best photo
                    used.add(int(i))
                    out.append((int(q), int(i)))
                break
    return out


def index_retention(encode, photos: list[Path], tokenizer, prep, config, progress) -> PairSet:
    """The retention pairs of `photos` under the model `encode` runs (still the base model)."""
    import torch
    import torch.nn.functional as F

    from ..storage.calibration import probe_queries
    from .data import Split, retention_split

    queries = probe_queries()
    every = PairSet([Pair(p, queries[0], IMAGE) for p in photos])
    split = retention_split(every, set(), prep, tokenizer, config, progress)
    if split is None:
        return PairSet()
    # the queries as captions of one photo: only their text side is used
    probe = Split(files=split.files[:1], file_of=np.zeros(len(queries), dtype=np.int64),
                  captions=queries, tokens=tokenizer(queries),
                  pixels=split.pixels[:1] if split.pixels is not None else None)  # fmt: skip
    encode.cache_frozen_prefixes(split, probe, progress=progress)
    encode.model.eval()
    bs = max(config.batch_size, 64)
    with torch.no_grad():
        img = torch.cat([encode.image(split, np.arange(s, min(s + bs, len(split.files))))
                         for s in range(0, len(split.files), bs)])  # fmt: skip
        txt = torch.cat([encode.text(probe, np.arange(s, min(s + bs, len(queries))))
                         for s in range(0, len(queries), bs)])  # fmt: skip
    img = F.normalize(img.float(), dim=-1).cpu().numpy()
    txt = F.normalize(txt.float(), dim=-1).cpu().numpy()
    pairs = base_model_pairs(img, txt)
    return PairSet([Pair(split.files[i], queries[q], IMAGE) for q, i in pairs])


def retention_pairs(pairs, index, train, val, encode, prep, tokenizer, progress):
    """(retention pairs, what they are): the user's retention pairs, else pairs from the photos
    of `index` (root, name) that the base model finds for generic queries, else (None, None)."""
    if pairs is not None:
        return pairs, "--retain pairs"
    if index is None:
        return None, None
    photos = indexed_photos(index[0], index[1], set(train.files) | set(val.files),
                            seed=encode.config.seed)  # fmt: skip
    if len(photos) < 2:
        return None, None
    pairs = index_retention(encode, photos, tokenizer, prep, encode.config, progress)
    return pairs, (f"{len(pairs)} photos of index '{index[1]}', each the base model's best for a "
                   "generic query")  # fmt: skip
