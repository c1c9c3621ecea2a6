"""CLAP's audio tower projected into the CLIP space: windows of audio in, CLIP-space vectors out.

Embedding is deterministic: log-mel features are computed here (the same numbers as
`ClapFeatureExtractor` with no random crop, see `LogMel`), windows never exceed the model's input
length, and `is_longer` is always False, so the feature extractor's random choices never run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...config import AudioWindowing
from ...errors import ModelError
from ...loaders.audio import DEFAULT_HOP_S, DEFAULT_WINDOW_S
from ..base import Encoder, EncoderIdentity, Tower
from .model import DEFAULT_AUDIO_MODEL, Clap, load_clap
from .projector import (
    PROJECTOR_FILENAME,
    FitSettings,
    Progress,
    Projector,
    load_projector,
    pick_projector,
)

AUDIO_MODEL_DIRNAME = "audio_model"  # a fine-tuned CLAP model (from_pretrained layout) beside it


class LogMel:
    """CLAP's log-mel features in torch: ClapFeatureExtractor's recipe for inputs no longer than its
    max length (the same repeat-padding, periodic Hann window, reflect padding, filter bank and dB
    floor), in float32 instead of float64: equal to rounding (< 0.01 dB) over the top 90 dB of each
    window, ~3x faster, and on the tower's device. Never crops, never draws random numbers."""

    def __init__(self, feature_extractor, device: str = "cpu"):
        import torch

        fe = feature_extractor
        self.fusion = fe.truncation == "fusion"
        # ClapFeatureExtractor uses the HTK bank for "fusion" and the Slaney bank otherwise.
        bank = fe.mel_filters if self.fusion else fe.mel_filters_slaney
        self.sample_rate = int(fe.sampling_rate)
        self.max_samples = int(fe.nb_max_samples)
        self.n_fft = int(fe.fft_window_size)
        self.hop = int(fe.hop_length)
        self.padding = fe.padding
        self.device = device
        self.bank = torch.tensor(np.asarray(bank), dtype=torch.float32, device=device)  # (F, M)
        self.window = torch.hann_window(self.n_fft, periodic=True, device=device)

    def pad(self, wave: np.ndarray) -> np.ndarray:
        """Cut or repeat-pad one window to the model's input length, as CLAP does."""
        w = np.asarray(wave, dtype=np.float32).reshape(-1)[: self.max_samples]
        n = len(w)
        if n == 0:
            raise ValueError("empty audio window")
        if n < self.max_samples:
            if self.padding == "repeat":
                w = np.tile(w, self.max_samples // n + 1)[: self.max_samples]
            elif self.padding == "repeatpad":
                w = np.tile(w, self.max_samples // n)
            w = np.pad(w, (0, self.max_samples - len(w)))
        return w

    def __call__(self, windows: Sequence[np.ndarray]):
        """(B, C, frames, mels) float32 features, C = 4 for fusion models (the same mel 4 times)."""
        import torch

        x = torch.from_numpy(np.stack([self.pad(w) for w in windows])).to(self.device)
        with torch.inference_mode():
            spec = torch.stft(
                x,
                self.n_fft,
                hop_length=self.hop,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )  # (B, F, frames)
            power = spec.real.square() + spec.imag.square()
            mel = (power.transpose(1, 2) @ self.bank).clamp_min(1e-10)
            feats = (10.0 * torch.log10(mel))[:, None]
            if self.fusion:
                feats = feats.expand(-1, 4, -1, -1).contiguous()
        return feats


class ClapAudioTower(Tower):
    """Mono float32 windows at `sample_rate` -> CLAP audio embedding -> projector -> CLIP space."""

    batch_size = 8

    def __init__(self, clap: Clap, projector: Projector, hop_s: float | None = None):
        import torch

        if projector.d_in != clap.dim:
            raise ModelError(
                f"audio projector takes {projector.d_in}-d input but {clap.spec} gives {clap.dim}-d"
            )
        self.clap = clap
        self.audio_model = clap.model.audio_model
        self.audio_projection = clap.model.audio_projection
        self.features = LogMel(clap.feature_extractor, clap.device)
        self.device, self.dtype = clap.device, clap.dtype
        self.projector = projector
        self._w = torch.from_numpy(projector.weight).to(clap.device)
        self._b = torch.from_numpy(projector.bias).to(clap.device)
        self.dim = projector.d_out
        self.sample_rate = self.features.sample_rate
        self.window_s = self.features.max_samples / self.sample_rate
        # Windows overlap by a quarter (10 s windows every 7.5 s for CLAP) unless told otherwise.
        hop = self.window_s * DEFAULT_HOP_S / DEFAULT_WINDOW_S if hop_s is None else hop_s
        self.hop_s = min(hop, self.window_s)
        if clap.device == "cuda":
            self.batch_size = 64
        fe = clap.feature_extractor
        record = {
            "spec": clap.spec,
            "weights": clap.weights,
            "projector": projector.hash,
            "projector_fit": projector.meta.get("method", "?"),
            "sample_rate": self.sample_rate,
            "window_s": self.window_s,
            "hop_s": self.hop_s,
            "features": {
                "mels": int(fe.feature_size),
                "n_fft": int(fe.fft_window_size),
                "hop_length": int(fe.hop_length),
                "fmin": float(fe.frequency_min),
                "fmax": float(fe.frequency_max),
                "truncation": fe.truncation,
                "padding": fe.padding,
            },
            "dim": self.dim,
        }
        # Weights, projector and everything that shapes the windows: equal keys, equal vectors.
        shape = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        record["key"] = f"{clap.weights}-{projector.hash}-{shape[:8]}"
        self.identity = EncoderIdentity.from_dict(record)

    def loader_settings(self) -> AudioWindowing:
        """How `loaders.audio.load_audio` cuts recordings for this tower."""
        return AudioWindowing(self.sample_rate, self.window_s, self.hop_s)

    def embed_clap(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """(n, d_clap) L2-normalised CLAP audio embeddings, before the projector."""
        return self._clap(batch).float().cpu().numpy()

    def pooled(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """(n, hidden) HTSAT pooled features, the input of CLAP's audio projection head."""
        return self._pooled(batch).float().cpu().numpy()

    def embed_batch(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        z = self._clap(batch).float()
        with torch.inference_mode():
            y = z @ self._w + self._b
        return y.cpu().numpy()

    def _pooled(self, batch: Sequence[np.ndarray]):
        import torch

        feats = self.features(batch).to(self.dtype)
        n = feats.shape[0]
        is_longer = torch.zeros((n, 1), dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            return self.audio_model(input_features=feats, is_longer=is_longer).pooler_output

    def _clap(self, batch: Sequence[np.ndarray]):
        import torch
        import torch.nn.functional as F

        pooled = self._pooled(batch)
        with torch.inference_mode():
            return F.normalize(self.audio_projection(pooled).float(), dim=-1)


def load_audio_tower(
    audio_model: str | None,
    text_encoder: Encoder,
    cache_dir: str | os.PathLike,
    device: str = "cpu",
    refit: bool = False,
    progress: Progress | None = None,
    projector: Projector | str | os.PathLike | None = None,
    captions: Sequence[str] | None = None,
    settings: FitSettings | None = None,
) -> ClapAudioTower:
    """The audio tower for `text_encoder`'s space.

    The CLAP model is `audio_model` if given, else the one a fine-tuned model directory carries
    (`model_dir_audio_model`), else LAION's. The projector is, in order: `projector` if given;
    `audio_projector.safetensors` in the CLIP model's directory if it is a fine-tuned local model
    (unless `refit`); the cached fit for this
    (CLIP model, CLAP weights, corpus, fit settings) in `cache_dir` (unless `refit`); else a new fit
    (a few minutes on CPU with the default models), which is then cached.

    `progress(stage, done, total)` is called while fitting, with stage "clap-text" and "clip-text"
    (captions embedded) and "fit".
    """
    clap = load_clap(
        audio_model or model_dir_audio_model(text_encoder) or DEFAULT_AUDIO_MODEL, device
    )
    proj = pick_projector(
        clap,
        text_encoder,
        Path(cache_dir),
        model_dir=model_dir_of(text_encoder),
        refit=refit,
        progress=progress,
        given=projector,
        captions=captions,
        settings=settings or FitSettings(),
    )
    tower = ClapAudioTower(clap, proj)
    if proj.d_out != text_encoder.dim:
        raise ModelError(
            f"audio projector maps to {proj.d_out}-d but the model's space is {text_encoder.dim}-d"
        )
    return tower


def model_dir_of(text_encoder: Encoder) -> Path | None:
    """The local model directory `text_encoder` was loaded from, if it was."""
    spec = text_encoder.identity.spec or ""
    return Path(spec[len("local-dir:") :]) if spec.startswith("local-dir:") else None


def model_dir_audio_model(text_encoder: Encoder) -> str | None:
    """The audio model a fine-tuned model directory names: its own `audio_model/` folder, else the
    CLAP model its `audio_projector.safetensors` was fitted for (if recorded), else None."""
    model_dir = model_dir_of(text_encoder)
    if model_dir is None:
        return None
    tuned = model_dir / AUDIO_MODEL_DIRNAME
    if (tuned / "config.json").is_file():
        return str(tuned.resolve())
    projector = model_dir / PROJECTOR_FILENAME
    if projector.is_file():
        return load_projector(projector).meta.get("clap_spec") or None
    return None
