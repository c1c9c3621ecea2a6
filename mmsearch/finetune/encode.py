"""Image and text features of the model being fine-tuned: from cached pixels, from features of
frozen tower parts computed once (and kept between runs in `config.feature_cache`), or from full
forward passes."""

from __future__ import annotations

import numpy as np

from ..encoders.text_parts import encode_text, split_text_tower
from .data import Split
from .evaluate import Recall, decode_images, recall_of_captions
from .features import (
    FeatureCache,
    file_keys,
    image_extra,
    module_hash,
    run_image_prefix,
    run_text_trunk,
    text_extra,
    token_keys,
)


class TrainEncoder:
    """Image and text features of the model being trained, from cached pixels, cached frozen
    prefixes, or full forward passes."""

    def __init__(self, model, device, prep, autocast, config, amp_dtype=None,
                 progress=None):  # fmt: skip
        import torch

        self.model, self.device, self.prep = model, device, prep
        self.autocast, self.config = autocast, config
        self.precision = "fp32" if amp_dtype is None else f"autocast-{amp_dtype}"
        self.cache = FeatureCache(config.feature_cache, progress=progress)
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

    def cache_frozen_prefixes(self, *splits: Split, progress) -> None:
        """Frozen tower parts run once per file / caption instead of every step, and once across
        runs through `config.feature_cache`."""
        for split in splits:
            split.tokens = split.tokens.to(self.device)
            # shortest first, so each batch is cut to similar lengths (no-grad passes only)
            split.by_length = np.argsort(
                (split.tokens != self.pad_id).sum(1).cpu().numpy(), kind="stable"
            )
        self._cache_image_prefix(splits, progress)
        self._cache_text_prefix(splits, progress)

    def _cache_image_prefix(self, splits, progress) -> None:
        from .methods import frozen_image_stage

        stage = frozen_image_stage(self.model)
        if stage is None:
            return
        prefix, self.image_suffix = stage
        prefix.eval()
        namespace = module_hash(prefix, image_extra(self.prep, self.precision))
        for split in splits:
            split.image_prefix = self.cache.features(
                "image", namespace, file_keys(split.files),
                lambda rows, split=split: run_image_prefix(
                    prefix, lambda idx: self.pixels(split, idx), rows, self._batch, self.device,
                    self.autocast, progress,
                ),
                self.device,
            )  # fmt: skip
            split.pixels = None  # the prefix features replace the pixels
        self.image_cached = True

    def _cache_text_prefix(self, splits, progress) -> None:
        import torch

        trunk_frozen = self.text_parts is not None and not any(
            p.requires_grad for m in self.text_parts.trunk for p in m.parameters()
        )
        if not trunk_frozen:
            return
        self.text_suffix = self.text_parts.project
        for m in self.text_parts.trunk:
            if isinstance(m, torch.nn.Module):
                m.eval()  # no dropout in features computed once
        for split in splits:
            split.text_prefix = self.cache.features(
                "text", self._text_namespace(), token_keys(split.tokens),
                lambda rows, split=split: run_text_trunk(
                    self.text_parts, split.tokens, rows, self.pad_id, self._batch, self.autocast,
                    progress,
                ),
                self.device,
            )  # fmt: skip
        self.text_cached = True

    @property
    def _batch(self) -> int:
        return max(self.config.batch_size, 64)

    def _text_namespace(self) -> str:
        return module_hash(self.text_parts.trunk, text_extra(self.precision))

    def _known_text_prefix(self, split: Split):
        """Text-trunk features of `split` from the feature cache when the (trainable) trunk is
        still bit-identical to one that ran on these captions, as before the first step of a
        run that starts from a model whose frozen text trunk was cached."""
        if self.text_cached or self.text_parts is None or self.cache.root is None:
            return None
        return self.cache.features(
            "text", self._text_namespace(), token_keys(split.tokens), None, self.device
        )

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


def frozen_copy(model):
    """A deep copy of `model` on the CPU in eval mode, nothing trainable."""
    import copy

    plain = copy.deepcopy(model).cpu().eval()
    plain.requires_grad_(False)
    return plain
