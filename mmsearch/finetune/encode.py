"""Image and text features of the model being fine-tuned: from cached pixels, from features of
frozen tower parts computed once (and kept between runs in `config.feature_cache`), or from full
forward passes."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

import numpy as np

from ..encoders.text_parts import encode_text, split_text_tower
from .config import FORMAT_VERSION
from .data import Split
from .evaluate import Recall, decode_images, recall_of_captions


class TrainEncoder:
    """Image and text features of the model being trained, from cached pixels, cached frozen
    prefixes, or full forward passes."""

    def __init__(self, model, device, prep, autocast, config, amp_dtype=None):
        import torch

        self.model, self.device, self.prep = model, device, prep
        self.autocast, self.config, self.amp = autocast, config, str(amp_dtype)
        self.mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1) * 255
        self.image_suffix = self.text_suffix = None
        self.image_cached = self.text_cached = False
        self.text_parts = split_text_tower(model)
        self.pad_id = self.text_parts.pad_id if self.text_parts else 0

    def pixels(self, split: Split, file_idx: np.ndarray):
        import torch

        if split.pixels is not None:
            batch = split.pixels[file_idx]
        else:
            paths = [split.files[i] for i in file_idx]
            batch = np.stack(decode_images(paths, self.prep, self.config.workers))
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def image(self, split: Split, file_idx: np.ndarray):
        if self.image_cached:
            import torch

            x = split.image_prefix[torch.from_numpy(file_idx).to(self.device)]
            return self.image_suffix(x) if self.image_suffix is not None else x
        return self.model.encode_image(self.pixels(split, file_idx))

    def text(self, split: Split, caption_idx: np.ndarray):
        import torch

        idx = torch.from_numpy(caption_idx).to(self.device)
        if self.text_cached:
            return self.text_suffix(split.text_prefix[idx])
        return encode_text(self.model, split.tokens[idx])

    def features(self, split: Split, caption_idx: np.ndarray):
        return self.image(split, split.file_of[caption_idx]), self.text(split, caption_idx)

    def cache_frozen_prefixes(self, train: Split, val: Split, progress) -> None:
        """Frozen tower parts run once per file / caption instead of every step."""
        for split in (train, val):
            split.tokens = split.tokens.to(self.device)
            # shortest first, so each batch is cut to similar lengths (no-grad passes only)
            split.by_length = np.argsort(
                (split.tokens != self.pad_id).sum(1).cpu().numpy(), kind="stable"
            )
        self._cache_image_prefix(train, val, progress)
        self._cache_text_prefix(train, val, progress)

    def _cache_image_prefix(self, train: Split, val: Split, progress) -> None:
        import torch

        from .methods import frozen_image_stage

        stage = frozen_image_stage(self.model)
        if stage is None:
            return
        bs = max(self.config.batch_size, 64)
        prefix, self.image_suffix = stage
        prefix.eval()
        # channels-last runs CPU convolution trunks ~1.4x faster; the layout is restored after
        fmt = torch.channels_last if self.device == "cpu" else torch.contiguous_format
        for split in (train, val):

            def compute(split=split):
                parts = []
                prefix.to(memory_format=fmt)
                for s in range(0, len(split.files), bs):
                    x = self.pixels(split, np.arange(s, min(s + bs, len(split.files))))
                    with torch.no_grad(), self.autocast():
                        parts.append(prefix(x.contiguous(memory_format=fmt)).float())
                    progress("features", tower="image", done=min(s + bs, len(split.files)),
                             total=len(split.files))  # fmt: skip
                prefix.to(memory_format=torch.contiguous_format)
                return torch.cat(parts)

            key = [
                ("files", [(str(f), _stat(f)) for f in split.files]),
                ("prep", self.prep.to_dict()),
            ]
            split.image_prefix = self._persisted("image", prefix, key, compute)
            split.pixels = None  # the prefix features replace the pixels
        self.image_cached = True

    def _cache_text_prefix(self, train: Split, val: Split, progress) -> None:
        import torch

        trunk_frozen = self.text_parts is not None and not any(
            p.requires_grad for m in self.text_parts.trunk for p in m.parameters()
        )
        if not trunk_frozen:
            return
        bs = max(self.config.batch_size, 64)
        pooled, self.text_suffix, trunk, _ = self.text_parts
        for m in trunk:
            if isinstance(m, torch.nn.Module):
                m.eval()  # no dropout in features computed once
        for split in (train, val):

            def compute(split=split):
                out = torch.empty(0)
                for s in range(0, len(split.by_length), bs):
                    idx = torch.from_numpy(split.by_length[s : s + bs]).to(self.device)
                    with torch.no_grad(), self.autocast():
                        x = pooled(split.tokens[idx]).float()
                    if s == 0:
                        out = torch.empty(len(split.by_length), x.shape[1], device=self.device)
                    out[idx] = x
                    progress("features", tower="text", done=min(s + bs, len(split.by_length)),
                             total=len(split.by_length))  # fmt: skip
                return out

            split.text_prefix = self._persisted("text", trunk, self._text_key(split), compute)
        self.text_cached = True

    def _text_key(self, split: Split) -> list:
        return [("tokens", hashlib.sha256(split.tokens.cpu().numpy().tobytes()).hexdigest())]

    def _cache_path(self, kind: str, modules, key: list) -> Path:
        """Named by everything the features depend on: weights, inputs, precision."""
        h = hashlib.sha256(json.dumps([FORMAT_VERSION, kind, self.amp, key]).encode())
        for m in modules if isinstance(modules, (list, tuple)) else [modules]:
            for name, t in m.state_dict().items():
                h.update(name.encode())
                h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
        return Path(self.config.feature_cache) / f"{kind}-{h.hexdigest()[:32]}.safetensors"

    def _persisted(self, kind: str, modules, key: list, compute):
        """compute(), or its result from `config.feature_cache` when the same frozen weights
        already ran on the same inputs."""
        from safetensors.torch import load_file, save_file

        if self.config.feature_cache is None:
            return compute()
        path = self._cache_path(kind, modules, key)
        if path.is_file():
            return load_file(str(path))["features"].to(self.device)
        feats = compute().float()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{secrets.token_hex(3)}.tmp")
        save_file({"features": feats.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
        return feats

    def _known_text_prefix(self, split: Split):
        """Text-trunk features of `split` from the feature cache when the (trainable) trunk is
        still bit-identical to one that ran on these captions, as before the first step of a
        run that starts from a model whose frozen text trunk was cached."""
        from safetensors.torch import load_file

        if self.text_cached or self.text_parts is None or self.config.feature_cache is None:
            return None
        path = self._cache_path("text", self.text_parts.trunk, self._text_key(split))
        return load_file(str(path))["features"].to(self.device) if path.is_file() else None

    def text_suffix_of(self, x):
        return self.text_parts.project(x)

    def recall(self, split: Split) -> Recall:
        import torch
        import torch.nn.functional as F

        self.model.eval()
        bs = max(self.config.batch_size, 64)
        img = []
        txt = torch.empty(0)
        known = self._known_text_prefix(split)
        # fp32, whatever the training precision: what `mmsearch eval` measures by default
        with torch.no_grad():
            for s in range(0, len(split.files), bs):
                x = self.image(split, np.arange(s, min(s + bs, len(split.files))))
                img.append(F.normalize(x.float(), dim=-1))
            for s in range(0, len(split.by_length), bs):
                idx = split.by_length[s : s + bs]
                if known is not None:  # the suffix on features an earlier run cached
                    x = self.text_suffix_of(known[torch.from_numpy(idx).to(self.device)])
                else:
                    x = self.text(split, idx)
                x = F.normalize(x.float(), dim=-1)
                if s == 0:
                    txt = torch.empty(len(split.by_length), x.shape[1], device=x.device)
                txt[torch.from_numpy(idx).to(x.device)] = x
        image_emb = torch.cat(img).cpu().numpy()
        return recall_of_captions(image_emb, txt.cpu().numpy(), split.captions, split.file_of)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def frozen_copy(model):
    """A deep copy of `model` on the CPU in eval mode, nothing trainable."""
    import copy

    plain = copy.deepcopy(model).cpu().eval()
    plain.requires_grad_(False)
    return plain
