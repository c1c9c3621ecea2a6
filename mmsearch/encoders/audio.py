"""Audio into the CLIP space: CLAP's audio tower (transformers' ClapModel) plus a projector.

The projector is an affine map from CLAP's embedding space into the CLIP space of the index. Its
first fit needs no audio (the text bridge of C-MCR, NeurIPS 2023): the shipped caption corpus is
embedded by CLAP's text tower and by CLIP's text tower, a map between the two text spaces is
learned (ridge least squares, then a short contrastive refinement kept only if it scores better on
held-out captions), and because CLAP's audio and text share one space the same map carries audio
into CLIP space. Fits are cached per (CLIP model, CLAP weights, corpus) and stored as safetensors.

Embedding is deterministic: log-mel features are computed here (the same numbers as
`ClapFeatureExtractor` with no random crop, see `log_mel`), windows never exceed the model's input
length, and `is_longer` is always False, so the feature extractor's random choices never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..config import AudioWindowing
from ..errors import ModelError
from ..loaders.audio import DEFAULT_HOP_S, DEFAULT_WINDOW_S
from .base import Encoder, Tower, l2_normalize

DEFAULT_AUDIO_MODEL = "laion/clap-htsat-unfused"
PROJECTOR_FILENAME = "audio_projector.safetensors"  # in a fine-tuned model directory
AUDIO_MODEL_DIRNAME = "audio_model"  # a fine-tuned CLAP model (from_pretrained layout) beside it
PROJECTOR_FORMAT = "1"
FIT_VERSION = "1"  # bump when fit_projector changes what it produces: cached fits are then refit
CLAP_MAX_TOKENS = 77  # LAION-CLAP tokenizes captions to 77 tokens

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------
# Projector


@dataclass(frozen=True)
class Projector:
    """y = x @ weight + bias, from L2-normalised CLAP embeddings (d_in) to the CLIP space (d_out).

    `meta` (strings only; stored in the safetensors header) says what it was fitted for and how.
    """

    weight: np.ndarray  # (d_in, d_out) float32
    bias: np.ndarray  # (d_out,) float32
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.weight.shape[1])

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for a in (self.weight, self.bias):
            a = np.ascontiguousarray(a, dtype=np.float32)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32) @ self.weight + self.bias

    def as_linear(self):
        """A torch.nn.Linear holding these weights (for fine-tuning on audio pairs)."""
        import torch

        lin = torch.nn.Linear(self.d_in, self.d_out)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(self.weight.T)))
            lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(self.bias)))
        return lin

    @classmethod
    def from_linear(cls, lin, meta: dict[str, str] | None = None) -> Projector:
        w = lin.weight.detach().float().cpu().numpy().T
        b = lin.bias.detach().float().cpu().numpy()
        return cls(np.ascontiguousarray(w), np.ascontiguousarray(b), dict(meta or {}))


def save_projector(projector: Projector, path: str | os.PathLike) -> Path:
    """Write `projector` as safetensors (atomically: a crash leaves the old file or the new one)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in projector.meta.items()}
    meta.update(format="mmsearch-audio-projector", format_version=PROJECTOR_FORMAT)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {
        "weight": np.ascontiguousarray(projector.weight, dtype=np.float32),
        "bias": np.ascontiguousarray(projector.bias, dtype=np.float32),
    }
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; a cache may be shared
    os.replace(tmp, path)
    return path


def load_projector(path: str | os.PathLike) -> Projector:
    """Read a projector written by `save_projector` (no pickle). Raises ModelError if unusable."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ModelError(f"cannot read audio projector {path}: {e}") from e
    if meta.get("format") != "mmsearch-audio-projector":
        raise ModelError(f"{path} is not an mmsearch audio projector")
    if meta.get("format_version") != PROJECTOR_FORMAT:
        raise ModelError(
            f"audio projector {path} has format version {meta.get('format_version')}, "
            f"this mmsearch reads {PROJECTOR_FORMAT}"
        )
    if weight.ndim != 2 or bias.shape != (weight.shape[1],):
        raise ModelError(f"audio projector {path} has shapes {weight.shape} and {bias.shape}")
    return Projector(weight.astype(np.float32), bias.astype(np.float32), meta)


# ---------------------------------------------------------------------------------------------
# CLAP


@dataclass
class Clap:
    """A loaded ClapModel with its tokenizer and feature-extractor settings."""

    model: object  # transformers.ClapModel
    tokenizer: object
    feature_extractor: object  # transformers.ClapFeatureExtractor (its settings; see log_mel)
    spec: str
    weights: str  # sha256 of the weights as loaded, 16 hex digits
    device: str
    dtype: object  # torch dtype the audio tower runs in

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def embed_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, d) L2-normalised CLAP text embeddings (fp32)."""
        import torch

        text_model = self.model.text_model
        dev = next(text_model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=CLAP_MAX_TOKENS,
                return_tensors="pt",
            ).to(dev)
            with torch.inference_mode():
                y = self.model.get_text_features(
                    input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
                ).pooler_output
            out.append(y.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(np.concatenate(out))


def load_clap(audio_model: str = DEFAULT_AUDIO_MODEL, device: str = "cpu") -> Clap:
    """Load a transformers ClapModel (hub id or local directory) and its processor."""
    import torch

    from .clip import pick_device

    device = pick_device(device)
    if audio_model.startswith("local-dir:"):  # the form manifests record local models in
        audio_model = audio_model[len("local-dir:") :]
    local = Path(audio_model).expanduser()
    source = str(local.resolve()) if local.is_dir() else audio_model
    if not local.is_dir() and _looks_like_path(audio_model):
        raise ModelError(
            f"could not load audio model {audio_model}: no such directory (--audio-model takes "
            "a Hugging Face id such as laion/clap-htsat-unfused, or a local model directory)"
        )
    try:
        with _quiet_transformers():
            model, processor = _from_pretrained(source, local.is_dir())
    except ModelError:
        raise
    except Exception as e:  # OSError offline/missing, ValueError/KeyError for a wrong directory
        from . import hub

        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in text:  # never pass on torch's advice to unpickle
            raise ModelError(hub.pickle_message(f"audio model {audio_model}")) from e
        raise ModelError(f"could not load audio model {audio_model}: {text}") from e
    model.eval()
    weights = _state_digest(model)
    # bf16 on CPU runs HTSAT ~6x slower than fp32 (window attention); fp16 only on CUDA.
    dtype = torch.float16 if device == "cuda" else torch.float32
    model.to(device)
    model.audio_model.to(dtype)
    model.audio_projection.to(dtype)
    return Clap(
        model=model,
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
        spec=f"local-dir:{source}" if local.is_dir() else audio_model,
        weights=weights,
        device=device,
        dtype=dtype,
    )


def _looks_like_path(text: str) -> bool:
    """A directory meant, not a hub id ("org/name")."""
    return (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    )


def _from_pretrained(source: str, is_dir: bool):
    """ClapModel and ClapProcessor from a directory, or from a hub id: the cache first, then one
    short check that the hub answers (see `hub`) before transformers downloads it."""
    from transformers import ClapModel, ClapProcessor

    from . import hub

    def load(**kw):
        return ClapModel.from_pretrained(source, **kw), ClapProcessor.from_pretrained(source, **kw)

    if is_dir:
        _refuse_pickle_dir(Path(source))
        return load()
    try:
        return load(local_files_only=True)
    except Exception:  # noqa: BLE001 - not (completely) in the cache
        pass
    what = f"audio model {source}"
    if not hub.on_hub(source, "config.json", what, "--audio-model"):
        raise ModelError(f"could not load {what}: {source} has no config.json on the hub")
    return load()


def _refuse_pickle_dir(folder: Path) -> None:
    from . import hub

    files = [f for f in folder.iterdir() if f.is_file()]
    if any(f.suffix == hub.SAFE_SUFFIX for f in files):
        return  # transformers prefers the safetensors file
    pickled = sorted(f.name for f in files if f.suffix in hub.PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(hub.pickle_message(str(folder / pickled[0])))


def save_clap(clap: Clap, out: str | os.PathLike, audio_projection: dict | None = None) -> Path:
    """Write `clap` (fp32, with `audio_projection`'s state dict in place of its own if given) and
    its processor in from_pretrained layout, so `ClapModel.from_pretrained(out)` loads it. It is
    written beside `out` and moved into place: a crash never leaves a half-written `out`."""
    import copy
    import shutil

    from transformers import ClapProcessor

    out = Path(out)
    model = copy.deepcopy(clap.model).float().cpu()
    if audio_projection is not None:
        model.audio_projection.load_state_dict(audio_projection)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_transformers():
        model.save_pretrained(tmp)
        ClapProcessor(
            feature_extractor=clap.feature_extractor, tokenizer=clap.tokenizer
        ).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _quiet_transformers():
    """Loading prints progress bars and warnings; the library never prints."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from . import hub

    bars = hf_logging.is_progress_bar_enabled()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()  # downloads
    hf_logging.set_verbosity_error()
    try:
        with hub.quiet():  # huggingface_hub's own retry and fallback warnings
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()


def _state_digest(model) -> str:
    """sha256 over the weights as loaded: names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Features


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


# ---------------------------------------------------------------------------------------------
# The tower


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
        self.identity = {
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
        shape = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()
        self.identity["key"] = f"{clap.weights}-{projector.hash}-{shape[:8]}"

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


# ---------------------------------------------------------------------------------------------
# Fitting


def read_captions() -> list[str]:
    """The shipped caption corpus (sound-event descriptions), one per line, comments dropped."""
    text = resources.files("mmsearch").joinpath("data/audio_captions.txt").read_text("utf-8")
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def captions_digest(captions: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FitSettings:
    val_fraction: float = 0.1
    ridge: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # x n/100; val picks
    refine_steps: int = 300
    refine_lr: float = 1e-3
    temperature: float = 0.05
    noise: float = 0.04  # C-MCR's Gaussian noise on inputs: robustness to the audio-text gap
    seed: int = 0

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def fit_projector(
    clap: Clap,
    text_encoder: Encoder,
    captions: Sequence[str] | None = None,
    settings: FitSettings = FitSettings(),
    progress: Progress | None = None,
) -> Projector:
    """Fit the CLAP -> CLIP projector on captions (default: the shipped corpus), no audio needed."""
    progress = progress or (lambda *a: None)
    captions = list(captions if captions is not None else read_captions())
    if len(captions) < 10:
        raise ModelError(
            f"fitting the audio projector needs at least 10 captions, got {len(captions)}"
        )
    x = _embed_in_steps(clap.embed_text, captions, "clap-text", progress)
    y = _embed_in_steps(text_encoder.encode_text, captions, "clip-text", progress)
    proj = fit_projector_from_embeddings(x, y, settings, progress)
    meta = dict(proj.meta)
    meta.update(
        clip=str(text_encoder.identity.get("key", "?")),
        clip_spec=str(text_encoder.identity.get("spec", "?")),
        clap=clap.weights,
        clap_spec=clap.spec,
        corpus=captions_digest(captions),
        n_captions=str(len(captions)),
    )
    return Projector(proj.weight, proj.bias, meta)


def _embed_in_steps(fn, texts, stage, progress, step=256) -> np.ndarray:
    # Batches of similar length waste less compute on padding; rows go back in caption order.
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    out = []
    progress(stage, 0, len(texts))
    for i in range(0, len(texts), step):
        out.append(fn([texts[j] for j in order[i : i + step]]))
        progress(stage, min(i + step, len(texts)), len(texts))
    vecs = np.empty((len(texts), out[0].shape[1]), dtype=np.float32)
    vecs[order] = np.concatenate(out)
    return l2_normalize(vecs)


def fit_projector_from_embeddings(
    x: np.ndarray,
    y: np.ndarray,
    settings: FitSettings = FitSettings(),
    progress: Progress | None = None,
) -> Projector:
    """Learn x -> y (rows paired) for L2-normalised x and y: ridge, then contrastive refinement.

    Held-out rows pick the ridge strength and decide whether the refinement is kept; the metric is
    recall@1 of held-out x among held-out y (ties broken by mean reciprocal rank).
    """
    progress = progress or (lambda *a: None)
    x = l2_normalize(x).astype(np.float64)
    y = l2_normalize(y).astype(np.float64)
    n = len(x)
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(n)
    n_val = max(1, int(round(n * settings.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    xt, yt, xv, yv = x[train], y[train], x[val], y[val]

    mx, my = xt.mean(0), yt.mean(0)
    xc, yc = xt - mx, yt - my
    gram, cross = xc.T @ xc, xc.T @ yc
    best = None
    for lam in settings.ridge:
        w = np.linalg.solve(gram + lam * len(train) / 100 * np.eye(gram.shape[0]), cross)
        b = my - mx @ w
        score = retrieval_scores(xv @ w + b, yv)
        if best is None or score > best[0]:
            best = (score, w, b, lam)
    ridge_score, w, b, lam = best
    meta = {
        "method": "ridge",
        "ridge_lambda": f"{lam:g}",
        "val_r1_ridge": f"{ridge_score[0]:.4f}",
        "n_train": str(len(train)),
        "n_val": str(len(val)),
        "fit_version": FIT_VERSION,
        "fit_settings": settings.key(),
    }
    progress("fit", 1, 2)

    if settings.refine_steps > 0 and len(train) >= 8:
        rw, rb, refined = _refine(xt, yt, xv, yv, w, b, settings)
        if refined > ridge_score:
            w, b = rw, rb
            meta["method"] = "ridge+contrastive"
        meta["val_r1_contrastive"] = f"{refined[0]:.4f}"
    meta["val_r1"] = f"{retrieval_scores(xv @ w + b, yv)[0]:.4f}"
    progress("fit", 2, 2)
    return Projector(w.astype(np.float32), b.astype(np.float32), meta)


def _refine(xt, yt, xv, yv, w0, b0, s: FitSettings):
    """Symmetric InfoNCE with Gaussian input noise, from the ridge solution; best val step kept."""
    import torch
    import torch.nn.functional as F

    from ..losses import info_nce

    gen = torch.Generator().manual_seed(s.seed)
    X, Y = torch.from_numpy(xt).float(), torch.from_numpy(yt).float()
    w = torch.from_numpy(w0).float().clone().requires_grad_(True)
    b = torch.from_numpy(b0).float().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=s.refine_lr)
    batch = min(512, len(X))
    best = (retrieval_scores(xv @ w0 + b0, yv), w0, b0)
    check = max(1, s.refine_steps // 10)
    for step in range(1, s.refine_steps + 1):
        idx = torch.randperm(len(X), generator=gen)[:batch]
        xb = X[idx] + s.noise * torch.randn(len(idx), X.shape[1], generator=gen)
        xb = F.normalize(xb, dim=-1)
        z = F.normalize(xb @ w + b, dim=-1)
        loss = info_nce(z, Y[idx], temperature=s.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check == 0 or step == s.refine_steps:
            wn, bn = w.detach().double().numpy(), b.detach().double().numpy()
            score = retrieval_scores(xv @ wn + bn, yv)
            if score > best[0]:
                best = (score, wn.copy(), bn.copy())
    return best[1], best[2], best[0]


def retrieval_scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(recall@1, mean reciprocal rank) of each pred row finding its own target row by cosine."""
    p, t = l2_normalize(pred), l2_normalize(target)
    sims = p @ t.T
    own = np.diag(sims)
    rank = (sims > own[:, None]).sum(1)  # 0 = found first
    return float((rank == 0).mean()), float((1.0 / (rank + 1)).mean())


# ---------------------------------------------------------------------------------------------
# Entry point


def load_audio_tower(
    audio_model: str | None,
    text_encoder: Encoder,
    cache_dir: str | os.PathLike,
    device: str = "cpu",
    refit: bool = False,
    progress: Progress | None = None,
    projector: Projector | str | os.PathLike | None = None,
    captions: Sequence[str] | None = None,
    settings: FitSettings = FitSettings(),
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
    proj = _pick_projector(
        clap, text_encoder, Path(cache_dir), refit, progress, projector, captions, settings
    )
    tower = ClapAudioTower(clap, proj)
    if proj.d_out != text_encoder.dim:
        raise ModelError(
            f"audio projector maps to {proj.d_out}-d but the model's space is {text_encoder.dim}-d"
        )
    return tower


def model_dir_of(text_encoder: Encoder) -> Path | None:
    """The local model directory `text_encoder` was loaded from, if it was."""
    spec = str(text_encoder.identity.get("spec", ""))
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


def projector_cache_path(
    cache_dir: Path,
    text_encoder: Encoder,
    clap: Clap,
    captions: Sequence[str],
    settings: FitSettings,
) -> Path:
    clip_key = str(text_encoder.identity.get("key", "unknown"))
    fit = hashlib.sha256(
        f"{FIT_VERSION}|{captions_digest(captions)}|{settings.key()}".encode()
    ).hexdigest()[:12]
    return Path(cache_dir) / f"audio-projector-{clip_key}-{clap.weights}-{fit}.safetensors"


def _pick_projector(clap, text_encoder, cache_dir, refit, progress, given, captions, settings):
    if isinstance(given, Projector):
        return given
    if given is not None:
        return _checked(load_projector(given), clap, given)
    model_dir = model_dir_of(text_encoder)
    if model_dir is not None and not refit:
        in_model = model_dir / PROJECTOR_FILENAME
        if in_model.is_file():
            return _checked(load_projector(in_model), clap, in_model)
    captions = list(captions if captions is not None else read_captions())
    cached = projector_cache_path(cache_dir, text_encoder, clap, captions, settings)
    if cached.is_file() and not refit:
        try:
            return _checked(load_projector(cached), clap, cached)
        except ModelError:
            pass  # a damaged cache entry is refit below
    proj = fit_projector(clap, text_encoder, captions, settings, progress)
    save_projector(proj, cached)
    return proj


def _checked(proj: Projector, clap: Clap, where) -> Projector:
    fitted_for = proj.meta.get("clap")
    if fitted_for and fitted_for != clap.weights:
        raise ModelError(
            f"audio projector {where} was fitted for audio model weights {fitted_for}, "
            f"but {clap.spec} has {clap.weights}"
        )
    return proj
