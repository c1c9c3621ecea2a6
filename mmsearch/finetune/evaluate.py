"""Retrieval recall@1/5/10 in both directions on a set of (file, caption) pairs.

Protocol (Flickr/COCO style): the gallery is the distinct files and the distinct captions.
text->image is a hit when one of the caption's files ranks in the top k (a caption shared by
several files, such as a class word or a tag, is one query any of them answers); image->text is a
hit when any of the file's captions does. Ties count against the model (a collapsed model scores
zero, not one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import EncoderOptions, ImagePrep, ModelSpec
from ..errors import LoadError, UsageError
from ..records import IMAGE
from .pairs import UNDECODABLE, PairSet, Skipped

KS = (1, 5, 10)
MIN_QUERIES = 50  # fewer distinct captions than this: a warning that recall is noisy
Progress = Callable[..., None]


def _quiet(event: str, **info) -> None:
    pass


@dataclass(frozen=True)
class Recall:
    """Fractions in [0, 1] keyed by k."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    images: int
    texts: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean of the six recalls (R@1/5/10 both ways): what picks the best epoch."""
        values = list(self.image_to_text.values()) + list(self.text_to_image.values())
        return float(np.mean(values)) if values else 0.0

    def to_dict(self) -> dict:
        return {
            "image_to_text": {f"R@{k}": round(v, 6) for k, v in self.image_to_text.items()},
            "text_to_image": {f"R@{k}": round(v, 6) for k, v in self.text_to_image.items()},
            "mean": round(self.mean, 6),
            "images": self.images,
            "texts": self.texts,
            **({"skipped": self.skipped} if self.skipped else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Recall:
        def ks(x):
            return {int(k.split("@")[1]): float(v) for k, v in x.items()}

        return cls(
            ks(d["image_to_text"]),
            ks(d["text_to_image"]),
            d["images"],
            d["texts"],
            d.get("skipped", {}),
        )


def recall_at_k(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_image: Sequence[int],
    ks: Sequence[int] = KS,
    chunk: int = 4096,
) -> Recall:
    """`text_image[t]` is the row of `image_emb` that caption t describes. Embeddings L2-normalised."""
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    g = np.asarray(text_image, dtype=np.int64)
    n_img, n_txt = len(image_emb), len(text_emb)
    if n_img == 0 or n_txt == 0:
        raise UsageError("no pairs to evaluate")
    # Pass 1: each caption's score with its own image, taken from the same matmul as the ranking.
    own = np.empty(n_txt, dtype=np.float32)
    for s in range(0, n_txt, chunk):
        sims = text_emb[s : s + chunk] @ image_emb.T
        own[s : s + chunk] = sims[np.arange(len(sims)), g[s : s + chunk]]
    best_own = np.full(n_img, -np.inf, dtype=np.float32)
    np.maximum.at(best_own, g, own)
    # Pass 2: ranks. A caption's rank = other images scoring >= its own image; an image's rank =
    # captions of other images scoring >= its best caption.
    t_rank = np.empty(n_txt, dtype=np.int64)
    i_rank = np.zeros(n_img, dtype=np.int64)
    for s in range(0, n_txt, chunk):
        sims = text_emb[s : s + chunk] @ image_emb.T
        rows = np.arange(len(sims))
        gi = g[s : s + chunk]
        t_rank[s : s + chunk] = (sims >= own[s : s + chunk, None]).sum(1) - 1
        beats = sims >= best_own[None, :]
        beats[rows, gi] = False
        i_rank += beats.sum(0)
    has_caption = np.isfinite(best_own)
    i2t = {k: float((i_rank[has_caption] < k).mean()) for k in ks}
    t2i = {k: float((t_rank < k).mean()) for k in ks}
    return Recall(i2t, t2i, int(has_caption.sum()), n_txt)


def recall_shared_captions(
    item_emb: np.ndarray,
    text_emb: np.ndarray,
    relevant: Sequence[tuple[int, int]],
    ks: Sequence[int] = KS,
    chunk: int = 4096,
) -> Recall:
    """Recall when a caption may describe several items (tags, class words): `relevant` lists the
    (text row, item row) pairs that match; texts should be distinct. item->text is a hit when any
    of the item's texts ranks in the top k among all texts; text->item when any of the text's items
    does among all items. Ties count against the model. With one item per text this is
    `recall_at_k`'s protocol. Texts are scored in chunks: memory stays chunk x items."""
    item_emb = np.asarray(item_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    if len(item_emb) == 0 or len(text_emb) == 0 or not len(relevant):
        raise UsageError("no pairs to evaluate")
    t_all, i_all = np.asarray(relevant, dtype=np.int64).T
    order = np.argsort(t_all, kind="stable")
    t_all, i_all = t_all[order], i_all[order]
    n_txt, n_item = len(text_emb), len(item_emb)

    def chunks():
        """(slice, sims, match) per chunk of texts."""
        for s in range(0, n_txt, chunk):
            sims = text_emb[s : s + chunk] @ item_emb.T
            lo, hi = np.searchsorted(t_all, [s, s + len(sims)])
            match = np.zeros(sims.shape, dtype=bool)
            match[t_all[lo:hi] - s, i_all[lo:hi]] = True
            yield slice(s, s + len(sims)), sims, match

    # Pass 1: each text's best matching item, each item's best matching text.
    t_best = np.full(n_txt, -np.inf, dtype=np.float32)
    i_best = np.full(n_item, -np.inf, dtype=np.float32)
    for rows, sims, match in chunks():
        pos = np.where(match, sims, -np.inf)
        t_best[rows] = pos.max(1)
        i_best = np.maximum(i_best, pos.max(0))
    # Pass 2: ranks = the non-matching ones scoring at least as high.
    t_rank = np.empty(n_txt, dtype=np.int64)
    i_rank = np.zeros(n_item, dtype=np.int64)
    for rows, sims, match in chunks():
        t_rank[rows] = ((sims >= t_best[rows, None]) & ~match).sum(1)
        i_rank += ((sims >= i_best[None, :]) & ~match).sum(0)
    has_t, has_i = np.isfinite(t_best), np.isfinite(i_best)
    i2t = {k: float((i_rank[has_i] < k).mean()) for k in ks}
    t2i = {k: float((t_rank[has_t] < k).mean()) for k in ks}
    return Recall(i2t, t2i, int(has_i.sum()), int(has_t.sum()))


def recall_of_captions(
    image_emb: np.ndarray, text_emb: np.ndarray, captions: Sequence[str], text_image: Sequence[int]
) -> Recall:
    """Recall of image pairs where a caption shared by several images (a class word, a tag, a
    folder name) is one query that any of them answers (`recall_shared_captions`); `text_emb[t]`
    embeds `captions[t]`, which describes image `text_image[t]`."""
    first: dict[str, int] = {}  # each distinct caption's first row
    for t, c in enumerate(captions):
        first.setdefault(c, t)
    row_of = {c: r for r, c in enumerate(first)}
    relevant = sorted({(row_of[c], int(i)) for c, i in zip(captions, text_image, strict=True)})
    return recall_shared_captions(image_emb, np.asarray(text_emb)[list(first.values())], relevant)


def small_split_warning(recall: Recall) -> str | None:
    """A warning when too few queries were measured for recall to mean much."""
    if recall.texts >= MIN_QUERIES:
        return None
    trivial = "; with 10 images or fewer every R@10 is 1.0" if recall.images <= 10 else ""
    return (
        f"only {recall.texts} distinct captions over {recall.images} images: too few for "
        f"recall to mean much{trivial}"
    )


def decode_images(
    paths: Sequence[Path], prep: ImagePrep, workers: int | None = None
) -> list[np.ndarray | LoadError]:
    """Each path decoded to the model's input (uint8 HxWx3), or the LoadError it raised."""
    # Here, not at the top: every CLI command imports this module; PIL and the pool cost ~30 ms.
    from concurrent.futures import ThreadPoolExecutor

    from ..loaders.image import load_image

    def one(p):
        try:
            return load_image(p, prep)
        except LoadError as e:
            return e

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 8:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes with the GIL released
        return list(pool.map(one, paths))


def evaluate(
    pairs: PairSet,
    model_spec: str | ModelSpec,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 64,
    progress: Progress | None = None,
    feature_cache: Path | None = None,
) -> Recall:
    """Recall@1/5/10 both ways of `model_spec` (a name, hf-hub id or model directory) on `pairs`,
    a caption shared by several images being one query (`recall_of_captions`). `precision` fp32
    (the default), bf16 or fp16, or auto (mixed precision where the device has it).

    Uses the same encoder path as indexing (`load_clip`). Undecodable files are left out and
    counted in `Recall.skipped`. Audio pairs are left to `finetune.audio.evaluate_audio`. With
    `feature_cache` (a folder), the image trunk's and text trunk's features are read from and
    kept in it (`finetune.features`): models that share a frozen tower (the runs of one
    fine-tuning recipe) compute it once.
    """
    from ..encoders.clip import load_clip

    progress = progress or _quiet
    spec = model_spec if isinstance(model_spec, ModelSpec) else ModelSpec.parse(str(model_spec))
    skipped = dict(pairs.skipped_counts())
    images = pairs.of(IMAGE)
    if not images.pairs:
        raise UsageError("no image pairs to evaluate")
    progress("load_model", model=str(spec))
    encoder = load_clip(spec, EncoderOptions(device=device, precision=precision))
    cached = None
    if feature_cache is not None:
        from .features import CachedEncoder

        cached = CachedEncoder(encoder, feature_cache, batch_size, decode_images, progress)
    index_of, image_emb, failed = {}, [], []
    files = images.files()
    for s in range(0, len(files), 512):  # decode and embed in slices to bound memory
        part = files[s : s + 512]
        good, emb, bad = cached.images(part) if cached else _embed_images(encoder, part, batch_size)
        failed += [Skipped(str(path), f"{UNDECODABLE}: {e.reason}") for path, e in bad]
        for p in good:
            index_of[p] = len(index_of)
        if good:
            image_emb.append(emb)
        progress("embed_images", done=min(s + 512, len(files)), total=len(files))
    if failed:
        skipped[UNDECODABLE] = len(failed)
    kept = [p for p in images.pairs if p.path in index_of]
    if not kept:
        raise UsageError("no decodable images to evaluate")
    captions = [p.caption for p in kept]
    text_emb = cached.texts(captions) if cached else encoder.text.embed(captions, batch_size)
    progress("embed_texts", done=len(kept), total=len(kept))
    r = recall_of_captions(
        np.concatenate(image_emb), text_emb, [p.caption for p in kept],
        [index_of[p.path] for p in kept],
    )  # fmt: skip
    return Recall(r.image_to_text, r.text_to_image, r.images, r.texts, skipped)


def _embed_images(encoder, paths, batch_size: int):
    """(the paths that decoded, their embeddings, (path, LoadError) of the others)."""
    good, bad = [], []
    for path, arr in zip(paths, decode_images(paths, encoder.prep), strict=True):
        (bad if isinstance(arr, LoadError) else good).append((path, arr))
    emb = encoder.image.embed([a for _, a in good], batch_size) if good else None
    return [p for p, _ in good], emb, bad
