"""Fine-tune an index's audio projector on (audio file, caption) pairs.

The CLAP audio model and the CLIP text tower stay frozen: only the linear projector from CLAP's
audio space into the CLIP space is refitted, with the same ridge + InfoNCE fit that builds the
text-bridge projector, but on real (audio, caption) pairs. Each audio file is one CLAP vector (mean
of its windows' embeddings, re-normalised); its captions' CLIP text embeddings are the targets.

The baseline ("before") is the projector `load_audio_tower` would use for `model_dir` today: the
model directory's own `audio_projector.safetensors` if it has one, else the text-bridge fit. Both
are scored on the same held-out files (split by file, seeded), and the better one on mean recall is
written to `model_dir/audio_projector.safetensors` (always, so the model directory is
self-contained), where `--model DIR` picks it up when indexing audio.

Recall reuses `evaluate.Recall`: its `image_to_text` slot holds audio->text recall and its
`text_to_image` slot text->audio recall; `images` counts held-out audio files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import EncoderOptions, ModelSpec
from ..encoders.audio import (
    PROJECTOR_FILENAME,
    ClapAudioTower,
    FitSettings,
    Projector,
    fit_projector_from_embeddings,
    load_audio_tower,
    save_projector,
)
from ..encoders.base import l2_normalize
from ..errors import LoadError, UsageError
from ..items import AUDIO
from ..loaders.audio import load_audio
from .evaluate import Recall, recall_at_k
from .pairs import UNDECODABLE, PairSet, split_by_file

Progress = Callable[..., None]


@dataclass
class AudioResult:
    before: Recall  # the projector in use before (model dir's own, else text bridge), held out
    after: Recall  # the projector fitted on the training pairs, held out
    projector: Path  # where the kept projector was written
    train_pairs: int
    val_pairs: int
    skipped: dict[str, int] = field(default_factory=dict)
    kept: str = "after"  # "after" or "before": which projector was written

    def to_dict(self) -> dict:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "projector": str(self.projector),
            "kept": self.kept,
            "train_pairs": self.train_pairs,
            "val_pairs": self.val_pairs,
            **({"skipped": self.skipped} if self.skipped else {}),
        }


def _quiet(event: str, **info) -> None:
    pass


def embed_audio_files(
    tower: ClapAudioTower, paths: list[Path], progress: Progress = _quiet
) -> tuple[dict[Path, np.ndarray], dict[Path, str]]:
    """Each file's CLAP vector (mean over its windows, L2-normalised), and the files that failed
    with their reason."""
    settings = tower.loader_settings()
    vectors: dict[Path, np.ndarray] = {}
    failed: dict[Path, str] = {}
    for i, path in enumerate(paths):
        try:
            windows = [w[2] for w in load_audio(path, **settings).windows]
        except LoadError as e:
            failed[path] = str(getattr(e, "reason", e))
            continue
        if not windows:
            failed[path] = "no audio"
            continue
        embs = [
            tower.embed_clap(windows[s : s + tower.batch_size])
            for s in range(0, len(windows), tower.batch_size)
        ]
        mean = np.concatenate(embs).astype(np.float64).mean(0, keepdims=True)
        vectors[path] = l2_normalize(mean).astype(np.float32)[0]
        progress("embed-audio", done=i + 1, total=len(paths))
    return vectors, failed


def _evaluate(projector: Projector, files: list[Path], clap: dict, text: np.ndarray, owner):
    audio = l2_normalize(projector(np.stack([clap[f] for f in files])))
    return recall_at_k(audio, text, owner)


def train_audio_projector(
    pairs: PairSet,
    model_dir: Path,
    audio_model: str | None,
    cache_dir: Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
    settings: FitSettings | None = None,
) -> AudioResult:
    """Fit the audio projector of `model_dir` (an open_clip local-dir model) on the audio pairs in
    `pairs` and save the better of it and the current projector as model_dir/audio_projector.

    `progress(event, **info)` is told "embed-audio" (done, total) and "fit" (stage, done, total).
    `settings` are the projector fit's (the text-bridge baseline uses its defaults).
    """
    from ..encoders.clip import load_clip

    progress = progress or _quiet
    settings = settings or FitSettings()
    model_dir = Path(model_dir)
    audio = pairs.of(AUDIO)
    if not audio.pairs:
        raise UsageError("no audio pairs to train on")
    text_encoder = load_clip(
        ModelSpec.parse(str(model_dir)), EncoderOptions(device=device, precision="fp32")
    )
    tower = load_audio_tower(audio_model, text_encoder, cache_dir, device=device)
    baseline = tower.projector

    files = sorted({p.path for p in audio.pairs})
    clap, failed = embed_audio_files(tower, files, progress)
    skipped = {UNDECODABLE: len(failed)} if failed else {}
    usable = PairSet([p for p in audio.pairs if p.path in clap], [], audio.source)
    train, val = split_by_file(usable, val_fraction, seed)
    if not train.pairs or not val.pairs:
        raise UsageError(
            f"need at least two decodable audio files to train and hold out "
            f"({len(clap)} decodable of {len(files)})"
        )

    captions = sorted({p.caption for p in usable.pairs})
    text_vecs = text_encoder.encode_text(captions) if captions else np.zeros((0, 0))
    text_of = {c: text_vecs[i] for i, c in enumerate(captions)}

    x = np.stack([clap[p.path] for p in train.pairs])
    y = np.stack([text_of[p.caption] for p in train.pairs])
    fitted = fit_projector_from_embeddings(
        x,
        y,
        settings,
        progress=lambda stage, done, total: progress("fit", stage=stage, done=done, total=total),
    )
    meta = dict(fitted.meta, fit=fitted.meta.get("method", "?"), method="finetuned")
    meta.update(clap=str(tower.identity["weights"]), pairs=str(len(train.pairs)))
    fitted = Projector(fitted.weight, fitted.bias, meta)

    val_files = sorted({p.path for p in val.pairs})
    row = {f: i for i, f in enumerate(val_files)}
    val_text = np.stack([text_of[p.caption] for p in val.pairs])
    owner = [row[p.path] for p in val.pairs]
    before = _evaluate(baseline, val_files, clap, val_text, owner)
    after = _evaluate(fitted, val_files, clap, val_text, owner)

    kept = "after" if after.mean >= before.mean else "before"
    out = save_projector(fitted if kept == "after" else baseline, model_dir / PROJECTOR_FILENAME)
    return AudioResult(
        before=before,
        after=after,
        projector=Path(out),
        train_pairs=len(train.pairs),
        val_pairs=len(val.pairs),
        skipped=skipped,
        kept=kept,
    )
