"""Fine-tune audio retrieval on (audio file, caption) pairs, and measure it.

The CLIP text tower stays frozen. By default only the linear projector from CLAP's audio space into
the CLIP space is refitted, with the same ridge + InfoNCE fit that builds the text-bridge projector,
but on real (audio, caption) pairs. With `tower="head"` CLAP's own audio projection head (the MLP
after the HTSAT trunk) is then trained jointly with that projector (symmetric InfoNCE against the
captions' CLIP text embeddings, learnable temperature, AdamW), and kept only if it beats the
projector alone on held-out pairs; the tuned CLAP model is saved in `model_dir/audio_model/`.

Each audio file is one vector: the mean of its windows' CLAP embeddings, re-normalised, then
projected. The HTSAT trunk is frozen, so its pooled output is computed once per window
(`window_features`); everything after it is cheap and runs on the CPU in fp32.

The baseline ("before") is what `load_audio_tower` would use for `model_dir` today: the model
directory's own audio model and projector if it has them, else the text-bridge fit. The best of
the candidates on held-out mean recall is written to `model_dir/audio_projector.safetensors`
(always, so the model directory is self-contained), where `--model DIR` picks it up.

Recall (`recall_shared_captions`): the gallery is the distinct captions and the files, and a
caption shared by several files (tags, class words) is one query that any of them answers.
`Recall.image_to_text` holds audio->text, `text_to_image` text->audio, `images` counts audio files.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import EncoderOptions, ModelSpec
from ..encoders.clap import (
    AUDIO_MODEL_DIRNAME,
    PROJECTOR_FILENAME,
    ClapAudioTower,
    FitSettings,
    Projector,
    fit_projector_from_embeddings,
    load_audio_tower,
    load_clap,
    save_clap,
    save_projector,
)
from ..errors import LoadError, UsageError
from ..loaders.audio import iter_windows
from ..records import AUDIO
from .evaluate import Recall, recall_shared_captions
from .pairs import UNDECODABLE, PairSet, split_by_file

Progress = Callable[..., None]
TOWERS = ("none", "head")  # what of CLAP's audio tower is trained besides the projector


def _quiet(event: str, **info) -> None:
    pass


@dataclass(frozen=True)
class HeadSettings:
    """Training of CLAP's audio projection head jointly with the projector (`tower="head"`)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4  # the head's (pretrained) weights
    projector_lr: float = 1e-3  # the projector and the temperature
    weight_decay: float = 0.01
    temperature: float = 0.05  # initial; learned
    eval_every: int = 25  # held-out recall every this many steps; the best step is kept
    loss_pairs: int = 2048  # training pairs the reported training loss is measured on
    seed: int = 0


@dataclass
class AudioResult:
    before: Recall  # the projector in use before (model dir's own, else text bridge), held out
    after: Recall  # the projector fitted on the training pairs, held out
    projector: Path  # where the kept projector was written
    train_pairs: int
    val_pairs: int
    skipped: dict[str, int] = field(default_factory=dict)
    kept: str = "after"  # "before", "after" or "head": which was written
    head: Recall | None = None  # projector + trained audio head, held out (tower="head")
    head_loss: tuple[float, float] | None = None  # training loss before and after the head
    head_step: int | None = None  # the step kept (0: training the head never helped)
    audio_model: Path | None = None  # the tuned CLAP model, when kept == "head"

    def to_dict(self) -> dict:
        d = {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "projector": str(self.projector),
            "kept": self.kept,
            "train_pairs": self.train_pairs,
            "val_pairs": self.val_pairs,
        }
        if self.head is not None:
            d["head"] = self.head.to_dict()
            d["head_loss"] = {"start": self.head_loss[0], "end": self.head_loss[1]}
            d["head_step"] = self.head_step
        if self.audio_model is not None:
            d["audio_model"] = str(self.audio_model)
        if self.skipped:
            d["skipped"] = self.skipped
        return d


def window_features(
    tower: ClapAudioTower, paths: list[Path], progress: Progress = _quiet
) -> tuple[dict[Path, np.ndarray], dict[Path, str]]:
    """Each file's HTSAT pooled features, one row per window (the frozen trunk's output, computed
    once), and the files that failed with their reason."""
    windowing = tower.loader_settings()
    rows: dict[Path, list[np.ndarray]] = {}
    failed: dict[Path, str] = {}
    batch: list[tuple[Path, np.ndarray]] = []  # windows of several short files share a batch

    def flush() -> None:
        for (path, _), row in zip(batch, tower.pooled([w for _, w in batch]), strict=True):
            rows.setdefault(path, []).append(row)
        batch.clear()

    for i, path in enumerate(paths):
        n = 0
        try:
            for _, _, window in iter_windows(path, windowing):  # streamed: long files too
                batch.append((path, window))
                n += 1
                if len(batch) == tower.batch_size:
                    flush()
        except LoadError as e:
            failed[path] = str(getattr(e, "reason", e))
            batch[:] = [b for b in batch if b[0] != path]
            rows.pop(path, None)
            continue
        if n == 0:
            failed[path] = "no audio"
        if i + 1 < len(paths):
            progress("embed-audio", done=i + 1, total=len(paths))
    if batch:
        flush()
    progress("embed-audio", done=len(paths), total=len(paths))
    return {p: np.stack(r) for p, r in rows.items()}, failed


class _Set:
    """Pairs ready for torch: every window's pooled features and its file, each pair as (file row,
    caption row), and the distinct captions' CLIP text vectors."""

    def __init__(self, pairs: PairSet, feats: dict[Path, np.ndarray], text_of: dict):
        import torch

        self.files = sorted({p.path for p in pairs.pairs})
        captions = sorted({p.caption for p in pairs.pairs})
        file_row = {f: i for i, f in enumerate(self.files)}
        text_row = {c: i for i, c in enumerate(captions)}
        self.pooled = torch.from_numpy(np.concatenate([feats[f] for f in self.files])).float()
        self.owner = torch.cat(
            [torch.full((len(feats[f]),), i, dtype=torch.long) for i, f in enumerate(self.files)]
        )
        self.pair_file = torch.tensor([file_row[p.path] for p in pairs.pairs])
        self.pair_text = torch.tensor([text_row[p.caption] for p in pairs.pairs])
        self.text = torch.from_numpy(np.stack([text_of[c] for c in captions])).float()
        self.relevant = sorted({(text_row[p.caption], file_row[p.path]) for p in pairs.pairs})

    def __len__(self) -> int:
        return len(self.pair_file)

    def clap_vectors(self, head, files=None):
        """(files, d_clap) L2-normalised: the mean of each file's windows through `head`."""
        import torch
        import torch.nn.functional as F

        if files is None:
            pooled, owner, n = self.pooled, self.owner, len(self.files)
        else:  # only these file rows (a training batch), in this order
            pick = torch.isin(self.owner, files)
            pooled, owner, n = (
                self.pooled[pick],
                torch.searchsorted(files, self.owner[pick]),
                len(files),
            )
        z = F.normalize(head(pooled).float(), dim=-1)
        return F.normalize(torch.zeros(n, z.shape[1]).index_add(0, owner, z), dim=-1)

    def recall(self, head, projector) -> Recall:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            audio = F.normalize(projector(self.clap_vectors(head)), dim=-1)
        return recall_shared_captions(audio.numpy(), self.text.numpy(), self.relevant)

    def loss(self, head, projector, scale, rows):
        """Symmetric InfoNCE over the pairs `rows` (sorted)."""
        import torch

        from ..losses import clip_loss

        files, inv = torch.unique(self.pair_file[rows], return_inverse=True)
        audio = projector(self.clap_vectors(head, files)[inv])
        text_ids = self.pair_text[rows]
        # rows that share a file or a caption are not each other's negatives
        return clip_loss(audio, self.text[text_ids], scale, groups=(inv, text_ids))


def _cpu_head(tower: ClapAudioTower):
    return copy.deepcopy(tower.audio_projection).float().cpu().eval()


def _train_head(head0, start: Projector, train: _Set, val: _Set, s: HeadSettings, progress):
    """Train CLAP's audio head and the projector from (head0, start); the best held-out step is
    kept. Returns (head state dict, projector, held-out recall, (loss before, loss after), step)."""
    import torch

    gen = torch.Generator().manual_seed(s.seed)
    head, lin = copy.deepcopy(head0).train(), start.as_linear()
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / s.temperature)))
    opt = torch.optim.AdamW(
        [
            {"params": list(head.parameters()), "lr": s.lr},
            {"params": list(lin.parameters()), "lr": s.projector_lr},
            {"params": [log_scale], "lr": s.projector_lr, "weight_decay": 0.0},
        ],
        weight_decay=s.weight_decay,
    )
    loss_rows = torch.randperm(len(train), generator=gen)[: s.loss_pairs].sort().values

    def train_loss() -> float:
        with torch.no_grad():
            return float(train.loss(head, lin, log_scale.exp(), loss_rows))

    def snapshot():
        return copy.deepcopy(head.state_dict()), copy.deepcopy(lin)

    first_loss = train_loss()
    best = (val.recall(head, lin), 0, *snapshot())
    batch = min(s.batch_size, len(train))
    for step in range(1, s.steps + 1):
        rows = torch.randperm(len(train), generator=gen)[:batch].sort().values
        loss = train.loss(head, lin, log_scale.exp().clamp(max=100.0), rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress("audio-step", step=step, steps=s.steps, loss=loss.item())
        if step % s.eval_every == 0 or step == s.steps:
            r = val.recall(head, lin)
            progress("audio-eval", step=step, recall=r)
            if r.mean > best[0].mean:
                best = (r, step, *snapshot())
    recall, step, state, lin = best
    head.load_state_dict(state)
    return state, lin, recall, (first_loss, train_loss()), step


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
    val_pairs: PairSet | None = None,
    tower: str = "none",
    head_settings: HeadSettings | None = None,
) -> AudioResult:
    """Fit the audio projector of `model_dir` (an open_clip local-dir model) on the audio pairs in
    `pairs` (held out: `val_pairs` if given, else a `val_fraction` of the files) and save the
    better of it and the current projector as model_dir/audio_projector. With `tower="head"`
    CLAP's audio projection head is trained too (`head_settings`), and kept with its projector
    (CLAP model in model_dir/audio_model/) only if it beats both on held-out mean recall.

    `progress(event, **info)` is told "embed-audio" (done, total), "fit" (stage, done, total),
    and with the head "audio-step" (step, steps, loss) and "audio-eval" (step, recall).
    `settings` are the projector fit's (the text-bridge baseline uses its defaults).
    """
    from ..encoders.clip import load_clip

    if tower not in TOWERS:
        raise UsageError(f"unknown audio tower training {tower!r}; use one of {', '.join(TOWERS)}")
    progress = progress or _quiet
    settings = settings or FitSettings()
    model_dir = Path(model_dir)
    audio = pairs.of(AUDIO)
    if not audio.pairs:
        raise UsageError("no audio pairs to train on")
    held = val_pairs.of(AUDIO) if val_pairs is not None else None
    if held is not None and not held.pairs:
        raise UsageError("no audio pairs to hold out in the validation pairs")
    text_encoder = load_clip(
        ModelSpec.parse(str(model_dir)), EncoderOptions(device=device, precision="fp32")
    )
    clap_tower = load_audio_tower(audio_model, text_encoder, cache_dir, device=device)
    baseline = clap_tower.projector

    files = sorted({p.path for p in audio.pairs} | {p.path for p in (held or audio).pairs})
    feats, failed = window_features(clap_tower, files, progress)
    skipped = {UNDECODABLE: len(failed)} if failed else {}
    usable = PairSet([p for p in audio.pairs if p.path in feats], [], audio.source)
    if held is None:
        train, val = split_by_file(usable, val_fraction, seed)
    else:
        train, val = usable, PairSet([p for p in held.pairs if p.path in feats], [], held.source)
    if not train.pairs or not val.pairs:
        raise UsageError(
            f"need at least two decodable audio files to train and hold out "
            f"({len(feats)} decodable of {len(files)})"
        )

    captions = sorted({p.caption for p in train.pairs + val.pairs})
    text_of = dict(zip(captions, text_encoder.encode_text(captions), strict=True))
    train_set, val_set = _Set(train, feats, text_of), _Set(val, feats, text_of)
    head = _cpu_head(clap_tower)

    import torch

    with torch.no_grad():
        x = train_set.clap_vectors(head)[train_set.pair_file].numpy()
    y = train_set.text[train_set.pair_text].numpy()
    fitted = fit_projector_from_embeddings(
        x,
        y,
        settings,
        progress=lambda stage, done, total: progress("fit", stage=stage, done=done, total=total),
    )
    clap_meta = {
        "clap": str(clap_tower.identity.weights),
        "clap_spec": clap_tower.identity.spec,
    }
    meta = dict(fitted.meta, fit=fitted.meta.get("method", "?"), method="finetuned")
    meta.update(clap_meta, pairs=str(len(train.pairs)))
    fitted = Projector(fitted.weight, fitted.bias, meta)

    before = val_set.recall(head, baseline.as_linear())
    after = val_set.recall(head, fitted.as_linear())
    kept, keep = ("after", fitted) if after.mean >= before.mean else ("before", baseline)
    result = AudioResult(
        before=before,
        after=after,
        projector=model_dir / PROJECTOR_FILENAME,
        train_pairs=len(train.pairs),
        val_pairs=len(val.pairs),
        skipped=skipped,
    )
    tuned_dir = model_dir / AUDIO_MODEL_DIRNAME
    if tower == "head":
        s = head_settings or HeadSettings(seed=seed)
        state, lin, recall, losses, step = _train_head(head, keep, train_set, val_set, s, progress)
        result.head, result.head_loss, result.head_step = recall, losses, step
        if recall.mean > max(before.mean, after.mean):
            saved = save_clap(clap_tower.clap, tuned_dir, state)
            weights = load_clap(str(saved), "cpu").weights  # the digest indexing will see
            meta = dict(meta, method="finetuned-head", head_step=str(step))
            meta.update(clap=weights, clap_spec=f"local-dir:{saved.resolve()}")
            kept, keep = "head", Projector.from_linear(lin, meta)
            result.audio_model = saved
    if kept != "head" and tuned_dir.exists():
        # A tuned CLAP model from an earlier run stays only if the kept projector is fitted for it.
        if clap_tower.identity.spec != f"local-dir:{tuned_dir.resolve()}":
            shutil.rmtree(tuned_dir)
    result.kept = kept
    save_projector(keep, result.projector)
    return result


def evaluate_audio(
    pairs: PairSet,
    model_spec: str | ModelSpec,
    audio_model: str | None,
    cache_dir: Path,
    device: str = "auto",
    progress: Progress | None = None,
) -> Recall:
    """Audio->text and text->audio recall@1/5/10 of the audio pairs in `pairs`, with the audio
    tower and projector that indexing with `--model model_spec` uses (`load_audio_tower`).
    Undecodable files are left out and counted in `Recall.skipped`."""
    from ..encoders.clip import load_clip

    progress = progress or _quiet
    audio = pairs.of(AUDIO)
    if not audio.pairs:
        raise UsageError("no audio pairs to evaluate")
    spec = model_spec if isinstance(model_spec, ModelSpec) else ModelSpec.parse(str(model_spec))
    progress("load_model", model=str(spec))
    text_encoder = load_clip(spec, EncoderOptions(device=device, precision="fp32"))
    tower = load_audio_tower(audio_model, text_encoder, cache_dir, device=text_encoder.device)
    feats, failed = window_features(tower, audio.files(), progress)
    usable = PairSet([p for p in audio.pairs if p.path in feats], [], audio.source)
    if not usable.pairs:
        raise UsageError("no decodable audio files to evaluate")
    captions = sorted({p.caption for p in usable.pairs})
    text_of = dict(zip(captions, text_encoder.encode_text(captions), strict=True))
    r = _Set(usable, feats, text_of).recall(_cpu_head(tower), tower.projector.as_linear())
    skipped = {UNDECODABLE: len(failed)} if failed else {}
    return Recall(r.image_to_text, r.text_to_image, r.images, r.texts, skipped)
