"""The projector: an affine map from CLAP's embedding space into the CLIP space of the index.

Its first fit needs no audio (the text bridge of C-MCR, NeurIPS 2023): the shipped caption corpus is
embedded by CLAP's text tower and by CLIP's text tower, a map between the two text spaces is
learned (ridge least squares, then a short contrastive refinement kept only if it scores better on
held-out captions), and because CLAP's audio and text share one space the same map carries audio
into CLIP space. Fits are cached per (CLIP model, CLAP weights, corpus) and stored as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ...errors import ModelError
from ..base import Encoder, l2_normalize
from .model import Clap

PROJECTOR_FILENAME = "audio_projector.safetensors"  # in a fine-tuned model directory
PROJECTOR_FORMAT = "1"
FIT_VERSION = "1"  # bump when fit_projector changes what it produces: cached fits are then refit

Progress = Callable[[str, int, int], None]


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
        clip=text_encoder.identity.key,
        clip_spec=str(text_encoder.identity.spec or "?"),
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

    from ...losses import info_nce

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


def projector_cache_path(
    cache_dir: Path,
    text_encoder: Encoder,
    clap: Clap,
    captions: Sequence[str],
    settings: FitSettings,
) -> Path:
    clip_key = text_encoder.identity.key
    fit = hashlib.sha256(
        f"{FIT_VERSION}|{captions_digest(captions)}|{settings.key()}".encode()
    ).hexdigest()[:12]
    return Path(cache_dir) / f"audio-projector-{clip_key}-{clap.weights}-{fit}.safetensors"


def pick_projector(
    clap: Clap,
    text_encoder: Encoder,
    cache_dir: Path,
    *,
    model_dir: Path | None = None,
    refit: bool = False,
    progress: Progress | None = None,
    given: Projector | str | os.PathLike | None = None,
    captions: Sequence[str] | None = None,
    settings: FitSettings = FitSettings(),
) -> Projector:
    """`given`; else the projector in the fine-tuned `model_dir`; else the cached fit; else a new
    fit, then cached (see `tower.load_audio_tower`). With `refit`, only `given` is taken as is:
    the model directory's and the cached projectors are passed over for a new fit."""
    if isinstance(given, Projector):
        return given
    if given is not None:
        return _checked(load_projector(given), clap, given)
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
