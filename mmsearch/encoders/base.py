"""The encoder interface: towers that embed one modality each, joined into one vector space."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import AudioWindowing, ImagePrep
from ..errors import ModelError, UnsupportedModalityError


def read_versioned(path: Path, fmt: str, version: int) -> dict:
    """A JSON file that names its own format and version (an export's config.json, a query
    tower's stamp), checked to be `fmt` v`version`. FileNotFoundError is left to the caller, who
    knows what a missing file means; anything else unreadable is a ModelError."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    got = (
        (data.get("format"), data.get("format_version")) if isinstance(data, dict) else (None,) * 2
    )
    if got != (fmt, version):
        raise ModelError(
            f"{path} has format {got[0]!r} v{got[1]}; this mmsearch reads {fmt!r} v{version}"
        )
    return data


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class EncoderIdentity:
    """What an index records about a model its vectors are made with (the manifest's `encoder`
    and `audio_encoder`, the catalog's meta): two models with equal `key`s make the same vectors.

    `details` holds what else the producing tower records (CLIP: architecture hash, preprocessing,
    context length; CLAP: projector, windows, features); it is written and read back verbatim, and
    only ever compared through `key`. `to_dict` writes the fields in the order `from_dict` read
    them (or the producer listed them), so the JSON on disk stays byte for byte what it was.
    """

    key: str
    spec: str | None = None  # the model as named (--model / --audio-model)
    weights: str | None = None  # a digest of the weights file (or the weights' name)
    dim: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)  # as recorded

    TYPED = ("key", "spec", "weights", "dim")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderIdentity:
        if not isinstance(d, Mapping) or not isinstance(d.get("key"), str):
            raise ValueError(f"an encoder identity needs a key: {d!r}")
        details = {k: v for k, v in d.items() if k not in cls.TYPED}
        return cls(d["key"], d.get("spec"), d.get("weights"), d.get("dim"), details, tuple(d))

    def to_dict(self) -> dict:
        values = {**{k: getattr(self, k) for k in self.TYPED}, **self.details}
        unread = [k for k, v in values.items() if k not in self.order and v is not None]
        return {k: values[k] for k in (*self.order, *unread) if k in values}


class Tower(ABC):
    """Embeds batches of one modality. Subclasses implement `embed_batch`; batching,
    float32 conversion and L2 normalisation are inherited."""

    batch_size: int = 32

    @abstractmethod
    def embed_batch(self, batch: Sequence[Any]) -> np.ndarray:
        """(len(batch), dim) array of unnormalised embeddings."""

    def embed(self, items: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        n = batch_size or self.batch_size
        parts = [self.embed_batch(items[i : i + n]) for i in range(0, len(items), n)]
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(np.concatenate(parts))

    dim: int = 0


@dataclass
class Encoder:
    """One vector space: a text tower plus optional image and audio towers mapped into it.

    `identity` is what an index's manifest records; two encoders with equal `identity.key`
    produce the same vectors.
    """

    identity: EncoderIdentity
    dim: int
    text: Tower | None = None
    image: Tower | None = None
    audio: Tower | None = None
    # How input is prepared for the towers (loaders read these) ...
    prep: ImagePrep | None = None  # image decoding for the image tower
    audio_windows: AudioWindowing | None = None  # recording windows for the audio tower
    # ... and the torch model behind the text/image towers (exporting the query tower, evaluation).
    model: Any = None
    tokenizer: Any = None
    device: str = "cpu"

    def _tower(self, modality: str) -> Tower:
        tower = getattr(self, modality)
        if tower is None:
            raise UnsupportedModalityError(
                f"model {self.identity.spec or '?'} cannot embed {modality}"
            )
        return tower

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised."""
        return self._tower("text").embed(list(texts))

    def encode_image(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Images as uint8 (H, W, 3) arrays already resized to the model's input size."""
        return self._tower("image").embed(list(images))

    def encode_audio(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """Mono float32 waveforms at the audio tower's sample rate, one window each."""
        return self._tower("audio").embed(list(windows))
