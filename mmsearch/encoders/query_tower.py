"""A second text tower for queries: a sentence-transformers model aligned to an index's CLIP text
space, so that a query in another language finds what the index's own text tower finds for the
same query in English.

Two kinds of source, told apart by `resolve`:
- a directory written by `mmsearch distill-text` (`finetune.distill`), stamped with the identity
  of the CLIP model it was distilled from (STAMP, a small JSON file in the directory);
- a published tower loaded by name, aligned to an open_clip model listed in PUBLISHED.

`check_alignment` refuses a tower aligned to another model than the index's; `load` gives a
`Tower` whose vectors live in the index's space. Only stdlib and numpy at import time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ModelError, ModelMismatchError, UsageError
from .base import EncoderIdentity, Tower, read_versioned

STAMP = "mmsearch_alignment.json"
STAMP_FORMAT = "mmsearch-query-tower"
STAMP_VERSION = 1

# Published sentence-transformers towers distilled onto a known open_clip model's text tower:
# name -> (the canonical specs of the open_clip models it fits, their dimension). A tower fits an
# index whose model spec is one of these (the weights behind a published NAME:TAG are fixed).
# clip-ViT-B-32-multilingual-v1: multilingual DistilBERT distilled onto OpenAI's ViT-B-32 text
# tower (Reimers & Gurevych 2020) for 50+ languages; open_clip loads OpenAI's weights under both
# names below.
PUBLISHED = {
    "sentence-transformers/clip-ViT-B-32-multilingual-v1": (
        ("ViT-B-32:openai", "ViT-B-32-quickgelu:openai"),
        512,
    ),
}


def published_name(source: str) -> str | None:
    """The PUBLISHED entry `source` names (with or without its organisation), or None."""
    for name in PUBLISHED:
        if source in (name, name.split("/", 1)[1]):
            return name
    return None


def resolve(source: str) -> str:
    """A --query-model value as recorded: an existing directory's absolute path, or the full
    name of a published tower."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve())
    name = published_name(source)
    if name is None:
        known = ", ".join(PUBLISHED)
        raise UsageError(
            f"--query-model {source}: no such directory, and not a published query tower "
            f"mmsearch knows (known: {known}; or make one with mmsearch distill-text)"
        )
    return name


def write_stamp(out_dir: Path, aligned_to: EncoderIdentity, student: str, **details) -> Path:
    """Stamp a tower directory with the identity (key, spec, dim) of the CLIP model it is
    aligned to."""
    stamp = {
        "format": STAMP_FORMAT,
        "format_version": STAMP_VERSION,
        "aligned_to": {"key": aligned_to.key, "spec": aligned_to.spec, "dim": aligned_to.dim},
        "student": student,
        **details,
    }
    path = Path(out_dir) / STAMP
    path.write_text(json.dumps(stamp, indent=2, sort_keys=True))
    return path


def alignment(source: str) -> dict:
    """What `source` (as `resolve` gives it) is aligned to: {key, spec, dim} from a directory's
    stamp, or {specs, dim} from PUBLISHED."""
    if source in PUBLISHED:
        specs, dim = PUBLISHED[source]
        return {"specs": list(specs), "dim": dim}
    path = Path(source) / STAMP
    try:
        stamp = read_versioned(path, STAMP_FORMAT, STAMP_VERSION)
    except FileNotFoundError:
        raise ModelError(
            f"{source} is not a query tower made by mmsearch distill-text (it has no {STAMP} "
            "naming the CLIP model it is aligned to)"
        ) from None
    return stamp["aligned_to"]


def fits(aligned: dict, identity: EncoderIdentity) -> bool:
    """Whether a tower aligned to `aligned` (`alignment`) fits an index built with `identity`."""
    if "key" in aligned:
        return aligned["key"] == identity.key
    return identity.spec in aligned["specs"] and aligned["dim"] == identity.dim


def check_alignment(source: str, identity: EncoderIdentity) -> dict:
    """The manifest record of query tower `source` for an index built with `identity`; raises
    ModelMismatchError when the tower is aligned to another model."""
    aligned = alignment(source)
    if not fits(aligned, identity):
        if "key" in aligned:
            theirs = f"{aligned['spec']} (weights key {aligned['key']})"
        else:
            theirs = " or ".join(aligned["specs"])
        raise ModelMismatchError(
            f"query tower {source} is aligned to model {theirs}, not to this index's "
            f"{identity.spec} (weights key {identity.key}); distill one for it: "
            f"mmsearch distill-text SENTENCES --model {identity.spec} --out DIR"
        )
    return {"source": source, "aligned_to": aligned}


def load(
    source: str, identity: EncoderIdentity, device: str = "cpu", cache_dir: Path | None = None
) -> Tower:
    """The query tower `source` (checked against `identity`) as a Tower of the index's space:
    its torch-free copy when `export` wrote one in `cache_dir`, else the torch model."""
    check_alignment(source, identity)
    target = None if cache_dir is None else export_dir(cache_dir, source)
    if target is not None and (target / "config.json").is_file():
        from .query_text import load_fast_text

        return load_fast_text(target)
    return SentenceTransformerTower.load(source, device)


def export_dir(cache_dir: Path, source: str) -> Path:
    """Where the torch-free copy of `source` lives in the index model's cache: named for the
    source and its stamp's time, so a tower distilled again is exported again."""
    stamp = Path(source) / STAMP
    made = stamp.stat().st_mtime_ns if source not in PUBLISHED and stamp.is_file() else 0
    digest = hashlib.sha256(json.dumps([source, made]).encode()).hexdigest()[:16]
    return Path(cache_dir) / "query" / digest


# sentence-transformers' pooling modes -> query_text.hf_export's
_POOLING = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last"}


def export(source: str, cache_dir: Path) -> bool:
    """Write the torch-free copy of query tower `source` (query_text.hf_export, verified against
    the sentence-transformers model); False when its architecture is not supported (searches then
    run it on torch)."""
    target = export_dir(cache_dir, source)
    if (target / "config.json").is_file():
        return True
    from .query_text.hf_export import export_hf_text_tower

    tower = SentenceTransformerTower.load(source, "cpu")
    modules = list(tower.model)
    if len(modules) < 2 or not hasattr(modules[0], "auto_model"):
        return False
    pool = modules[1]
    mode = getattr(pool, "pooling_mode", None) or pool.get_pooling_mode_str()
    if mode not in _POOLING:
        return False
    return export_hf_text_tower(
        modules[0].auto_model.float(),
        modules[0].tokenizer,
        target,
        pooling=_POOLING[mode],
        projection=modules[2:] or None,
        context_length=int(tower.model.max_seq_length),
        reference_embed=tower.embed_batch,
    )


def embedding_dimension(model) -> int:
    """A sentence-transformers model's output dimension (the method's name changed in 6.0)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get() or 0)


class SentenceTransformerTower(Tower):
    """A sentence-transformers model as a Tower (torch)."""

    def __init__(self, model, source: str):
        self.model = model
        self.source = source
        self.dim = embedding_dimension(model)

    @classmethod
    def load(cls, source: str, device: str = "cpu") -> SentenceTransformerTower:
        from . import hub
        from .clip import pick_device

        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:  # a declared dependency: a broken install
            raise ModelError(f"sentence-transformers is not installed ({e})") from None
        local = source not in PUBLISHED
        try:
            with hub.quiet(), quiet_transformers():
                model = SentenceTransformer(
                    source, device=pick_device(device), local_files_only=local or hub.offline()
                )
        except Exception as e:  # noqa: BLE001 - sentence-transformers raises OSError/ValueError/...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"could not load query tower {source}: {first}") from e
        model.eval()
        return cls(model, source)

    def embed_batch(self, batch: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model.encode(
                list(batch), batch_size=len(batch), show_progress_bar=False, convert_to_numpy=True
            )
        return np.asarray(out, dtype=np.float32)


class quiet_transformers:
    """transformers draws progress bars on stderr while loading weights; the library never
    prints."""

    def __enter__(self):
        from transformers.utils import logging

        self.was = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self.was:
            from transformers.utils import logging

            logging.enable_progress_bar()
