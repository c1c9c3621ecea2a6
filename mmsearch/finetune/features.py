"""Features of frozen tower parts kept on disk, so a locked tower runs once per file across
fine-tuning runs and evaluations.

A namespace is one frozen module as it runs: a hash of its weights, the preprocessing and the
precision. Inside it, features are stored per item under the item's own key: the hash of a file's
content (so a renamed copy hits and an edited file misses) or of a caption's tokens. Each run
that computes something new writes one shard, `<root>/<namespace>/<random>.safetensors`, to a
temporary name and renames it into place: readers see whole shards only, concurrent runs never
write the same file, and a crash leaves at most a stray temporary (swept on the next write).
The cache is bounded: past `max_bytes` the least recently used shards are deleted (reads touch a
shard's mtime). Deleting the folder at any time is safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IndexWriteError
from ..storage.atomic import replace_file

FORMAT = 1
DEFAULT_MAX_BYTES = 4 << 30
STALE_TMP_S = 3600  # a temporary this old belongs to a crashed writer


def default_dir() -> Path:
    """Beside the cached models of the index root: `<index root>/.models/features`."""
    from ..config import index_root

    return index_root() / ".models" / "features"


@dataclass
class CacheStats:
    """Items read back and items computed, per tower ("image", "text")."""

    hits: dict[str, int] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)

    def add(self, tower: str, hits: int, computed: int) -> None:
        self.hits[tower] = self.hits.get(tower, 0) + hits
        self.computed[tower] = self.computed.get(tower, 0) + computed

    def to_dict(self) -> dict:
        return {"hits": dict(self.hits), "computed": dict(self.computed)}


def file_keys(paths: Sequence[Path]) -> list[str]:
    """Per file, the hash of its content."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
        out.append(h.hexdigest()[:32])
    return out


def token_keys(tokens) -> list[str]:
    """Per caption (a row of token ids), the hash of its tokens."""
    rows = tokens.cpu().numpy().astype(np.int64)
    return [hashlib.sha256(r.tobytes()).hexdigest()[:32] for r in rows]


def image_extra(prep, precision: str) -> dict:
    """What an image prefix's features depend on besides its weights and the file."""
    return {"part": "image", "prep": prep.to_dict(), "precision": precision}


def text_extra(precision: str) -> dict:
    return {"part": "text-trunk", "precision": precision}


def run_image_prefix(prefix, pixels, rows, batch_size, device, autocast, progress):
    """`prefix` on the images `rows` (`pixels(idx)`: normalised pixels of those), in batches."""
    import torch

    # channels-last runs CPU convolution trunks ~1.4x faster; the layout is restored after
    fmt = torch.channels_last if str(device) == "cpu" else torch.contiguous_format
    parts = []
    prefix.to(memory_format=fmt)
    try:
        for s in range(0, len(rows), batch_size):
            x = pixels(rows[s : s + batch_size])
            with torch.no_grad(), autocast():
                parts.append(prefix(x.contiguous(memory_format=fmt)).float())
            progress("features", tower="image", done=min(s + batch_size, len(rows)),
                     total=len(rows))  # fmt: skip
    finally:
        prefix.to(memory_format=torch.contiguous_format)
    return torch.cat(parts)


def run_text_trunk(parts, tokens, rows, pad_id, batch_size, autocast, progress):
    """The pooled text-trunk features (`parts`: a `TextSplit`) of the captions `rows` of
    `tokens`; shortest first, so each batch is cut to similar lengths."""
    import torch

    rows = np.asarray(rows)
    lengths = (tokens[torch.from_numpy(rows).to(tokens.device)] != pad_id).sum(1).cpu().numpy()
    order = np.argsort(lengths, kind="stable")
    out = None
    for s in range(0, len(rows), batch_size):
        pick = order[s : s + batch_size]
        with torch.no_grad(), autocast():
            x = parts.pooled(tokens[torch.from_numpy(rows[pick]).to(tokens.device)]).float()
        if out is None:
            out = torch.empty(len(rows), x.shape[1], device=x.device)
        out[torch.from_numpy(pick).to(x.device)] = x
        progress("features", tower="text", done=min(s + batch_size, len(rows)), total=len(rows))
    return out


def module_hash(modules, extra) -> str:
    """The namespace of `modules` (a module, or a list of modules and parameter holders) as they
    run with `extra` (preprocessing, precision...): any changed weight gives another."""
    import torch

    h = hashlib.sha256(json.dumps([FORMAT, extra], sort_keys=True, default=str).encode())
    for m in modules if isinstance(modules, (list, tuple)) else [modules]:
        items = m.state_dict().items() if hasattr(m, "state_dict") else [("", m)]
        for name, t in items:
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class FeatureCache:
    """Per-item features on disk under `root` (None: nothing is kept; every lookup misses)."""

    def __init__(self, root: Path | None, max_bytes: int = DEFAULT_MAX_BYTES, progress=None):
        self.root = Path(root).expanduser() if root is not None else None
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self.progress = progress or (lambda event, **info: None)

    def features(
        self,
        tower: str,
        namespace: str,
        keys: Sequence[str],
        compute: Callable[[np.ndarray], object] | None,
        device="cpu",
    ):
        """(len(keys), dim) float32 torch features: those of known keys read back, the rest from
        `compute(indices)` (the rows of the missing keys, in order) and stored. Without
        `compute`: the features only if every key is known, else None."""
        import torch

        found = self._lookup(tower, namespace, keys)
        missing = np.array([i for i, k in enumerate(keys) if k not in found], dtype=np.int64)
        if compute is None and (len(missing) or not keys):
            return None
        self.stats.add(tower, len(keys) - len(missing), len(missing))
        self.progress("feature_cache", tower=tower, hits=len(keys) - len(missing),
                      computed=len(missing))  # fmt: skip
        new = None
        if len(missing):
            new = compute(missing).float()
            self._store(tower, namespace, [keys[i] for i in missing], new)
        dim = new.shape[1] if new is not None else next(iter(found.values())).shape[0]
        out = torch.empty(len(keys), dim, device=device)
        if new is not None:
            out[torch.from_numpy(missing).to(device)] = new.to(device)
        for i, k in enumerate(keys):
            if k in found:
                out[i] = found[k].to(device)
        return out

    def known(self, tower: str, namespace: str, keys: Sequence[str]) -> set[str]:
        """The keys whose features are stored."""
        return set(self._lookup(tower, namespace, keys))

    def _dir(self, tower: str, namespace: str) -> Path:
        return self.root / f"{tower}-{namespace}"

    def _lookup(self, tower: str, namespace: str, keys: Sequence[str]) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if self.root is None:
            return {}
        wanted, found = set(keys), {}
        folder = self._dir(tower, namespace)
        for shard in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                data = load_file(str(shard))
            except (OSError, SafetensorError):  # evicted meanwhile, or damaged: a miss
                continue
            shard_keys = [bytes(r).hex() for r in data["keys"].numpy()]
            used = False
            for row, k in enumerate(shard_keys):
                if k in wanted and k not in found:
                    found[k], used = data["features"][row], True
            if used:
                _touch(shard)
            if len(found) == len(wanted):
                break
        return found

    def _store(self, tower: str, namespace: str, keys: list[str], feats) -> None:
        import torch
        from safetensors.torch import save

        if self.root is None:
            return
        folder = self._dir(tower, namespace)
        raw = np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8)
        blob = save({
            "keys": torch.from_numpy(raw.reshape(len(keys), -1).copy()),
            "features": feats.detach().cpu().float().contiguous(),
        })  # fmt: skip
        try:
            folder.mkdir(parents=True, exist_ok=True)
            replace_file(folder / f"{secrets.token_hex(8)}.safetensors", lambda f: f.write(blob),
                         index=False)  # fmt: skip
        except (OSError, IndexWriteError) as e:  # the run goes on; only the reuse is lost
            self.progress("warning", message=f"feature cache not written: {e}")
            return
        self._evict()

    def _evict(self) -> None:
        """Delete the least recently used shards past `max_bytes`, and stale temporaries."""
        shards, total, now = [], 0, time.time()
        for f in self.root.glob("*/*"):
            try:
                st = f.stat()
            except OSError:
                continue
            if f.name.endswith(".tmp"):
                if now - st.st_mtime > STALE_TMP_S:
                    _unlink(f)
                continue
            shards.append((st.st_mtime, st.st_size, f))
            total += st.st_size
        for _, size, f in sorted(shards):
            if total <= self.max_bytes:
                break
            _unlink(f)
            total -= size


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class CachedEncoder:
    """An `Encoder`'s image and text embeddings with their frozen-able parts (a timm image trunk
    or the whole image tower; the text trunk before its projection) read from / kept in a
    `FeatureCache`: what `evaluate` runs when given a feature cache. Same results as the
    encoder's own towers (L2-normalised float32), up to float rounding."""

    def __init__(self, encoder, root: Path, batch_size: int, decode, progress=None):
        import torch

        from ..encoders.text_parts import split_text_tower

        self.encoder, self.batch_size, self.decode = encoder, batch_size, decode
        self.progress = progress or (lambda event, **info: None)
        self.cache = FeatureCache(root, progress=self.progress)
        model, self.device = encoder.model, encoder.device
        self.dtype = next(model.parameters()).dtype
        precision = "fp32" if self.dtype == torch.float32 else f"cast-{self.dtype}"
        visual = model.visual
        trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
        # TimmModel.forward is head(trunk(x)); any other tower is cached whole
        self.prefix, self.suffix = (trunk, head) if trunk is not None and head is not None else (
            visual, None)  # fmt: skip
        self.image_ns = module_hash(self.prefix, image_extra(encoder.prep, precision))
        self.text_parts = split_text_tower(model)
        if self.text_parts is not None:
            self.text_ns = module_hash(self.text_parts.trunk, text_extra(precision))
        prep = encoder.prep
        self.mean = torch.tensor(prep.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(prep.std, device=self.device).view(1, 3, 1, 1) * 255

    def images(self, paths):
        """(the paths whose features exist or that decoded, their embeddings, (path, LoadError)
        of the others). Files already in the cache are not decoded."""
        import torch

        keys, readable = [], []
        for p in paths:
            try:
                keys += file_keys([p])
                readable.append(p)
            except OSError:
                pass
        known = self.cache.known("image", self.image_ns, keys)
        todo = [i for i, k in enumerate(keys) if k not in known]
        arrays, bad = {}, []
        for i, arr in zip(todo, self.decode([readable[i] for i in todo], self.encoder.prep),
                          strict=True):  # fmt: skip
            if isinstance(arr, Exception):
                bad.append((readable[i], arr))
            else:
                arrays[i] = arr
        good = [i for i in range(len(keys)) if keys[i] in known or i in arrays]
        if not good:
            return [], None, bad

        def pixels(rows):
            x = np.stack([arrays[good[r]] for r in rows])
            x = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float()
            return ((x - self.mean) / self.std).to(self.dtype)

        with torch.inference_mode():
            feats = self.cache.features(
                "image", self.image_ns, [keys[i] for i in good],
                lambda rows: run_image_prefix(self.prefix, pixels, rows, self.batch_size,
                                              self.device, _no_autocast, self.progress),
                self.device,
            )  # fmt: skip
            if self.suffix is not None:
                feats = self.suffix(feats.to(self.dtype))
        return [readable[i] for i in good], _normalized(feats), bad

    def texts(self, captions: list[str]) -> np.ndarray:
        import torch

        if self.text_parts is None:
            return self.encoder.text.embed(captions, self.batch_size)
        tokens = self.encoder.tokenizer(captions).to(self.device)
        with torch.inference_mode():
            pooled = self.cache.features(
                "text", self.text_ns, token_keys(tokens),
                lambda rows: run_text_trunk(self.text_parts, tokens, rows, self.text_parts.pad_id,
                                            self.batch_size, _no_autocast, self.progress),
                self.device,
            )  # fmt: skip
            return _normalized(self.text_parts.project(pooled.to(self.dtype)))


def _normalized(x) -> np.ndarray:
    from ..encoders.base import l2_normalize

    return l2_normalize(x.float().cpu().numpy())


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()
