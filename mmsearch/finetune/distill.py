"""A query tower for other languages, by multilingual knowledge distillation (Reimers and
Gurevych, EMNLP 2020, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
Distillation"): a sentence-transformers student, with a fresh Dense layer to the CLIP dimension,
learns to put a sentence and each of its translations where the teacher, an index's CLIP text
tower, puts the sentence (MSE to the teacher's L2-normalised embedding).

    sentences = read_sentences(Path("captions.tsv"))
    result = distill(sentences, teacher, DistillConfig(out=Path("towers/mine")))
    SentenceTransformer("towers/mine")  # loads; its mmsearch_alignment.json names the teacher

Held-out sentences (and their translations) measure the agreement with the teacher (mean cosine)
before and after; with image pairs, text->image recall with the student's queries beside the
teacher's. The epoch with the best held-out agreement is kept.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..encoders import Encoder, l2_normalize
from ..encoders.query_tower import (
    SentenceTransformerTower,
    embedding_dimension,
    quiet_transformers,
    write_stamp,
)
from ..errors import LoadError, UsageError
from ..records import IMAGE
from .evaluate import Recall, decode_images, recall_at_k
from .pairs import PairSet

# A multilingual MiniLM (50+ languages, 118M parameters), the student users get by default.
DEFAULT_STUDENT = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
Progress = Callable[..., None]


@dataclass(frozen=True)
class Sentences:
    """Sentences in the teacher's language (distinct) and translations of some of them."""

    sources: list[str]
    translations: list[tuple[int, str]]  # (index in sources, translation)
    skipped: int = 0  # lines with no sentence before the tab


def read_sentences(path: Path) -> Sentences:
    """A text file of sentences, one a line, or of `sentence<TAB>translation[<TAB>...]` lines,
    or both mixed. Blank lines are ignored; a line with no sentence before its tab is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"sentences file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not a file of sentences") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    index: dict[str, int] = {}
    translations, skipped = [], 0
    for line in text.splitlines():
        fields = [f.strip() for f in line.split("\t")]
        if not any(fields):
            continue
        if not fields[0]:
            skipped += 1
            continue
        i = index.setdefault(fields[0], len(index))
        translations += [(i, t) for t in fields[1:] if t]
    if len(index) < 2:
        raise UsageError(f"{path}: {len(index)} sentences; distillation needs at least 2")
    return Sentences(list(index), list(dict.fromkeys(translations)), skipped)


@dataclass(frozen=True)
class DistillConfig:
    out: Path
    student: str = DEFAULT_STUDENT  # a sentence-transformers model name or directory
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-5  # the student's own layers
    head_lr: float = 1e-2  # the fresh Dense layer (1e-3 underfit it: benchmarks/RESULTS.md)
    warmup_fraction: float = 0.1
    val_fraction: float = 0.1  # sentences held out (with their translations)
    max_val: int = 1000
    max_seq_length: int = 128
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False


@dataclass
class Agreement:
    """Mean cosine to the teacher's embedding of the sentence, on held-out rows."""

    sentences: float
    translations: float | None  # None: no held-out translations


@dataclass
class DistillResult:
    out: Path
    teacher: str
    student: str
    train_rows: int  # sentences + translations trained on
    val_sentences: int
    val_translations: int
    before: Agreement
    after: Agreement
    best_epoch: int  # 0: no epoch beat the untrained student
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    recall_teacher: Recall | None = None  # text->image with the teacher's queries (--pairs)
    recall_student: Recall | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        for k in ("recall_teacher", "recall_student"):
            r = getattr(self, k)
            d[k] = r.to_dict() if r is not None else None
        return d


def distill(
    sentences: Sentences,
    teacher: Encoder,
    config: DistillConfig,
    pairs: PairSet | None = None,
    progress: Progress | None = None,
) -> DistillResult:
    """Train a student for `teacher`'s text space and write it to `config.out`, stamped."""
    import torch

    from ..encoders.clip import pick_device

    progress = progress or (lambda event, **info: None)
    started = time.perf_counter()
    out = _check_out(config)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(sentences.sources))
    n_val = min(config.max_val, max(1, round(config.val_fraction * len(order))))
    held = set(order[:n_val].tolist())
    train = [(s, i) for i, s in enumerate(sentences.sources) if i not in held]
    train += [(t, i) for i, t in sentences.translations if i not in held]
    val_src = sorted(held)
    val_tr = [(t, i) for i, t in sentences.translations if i in held]

    progress("teacher", done=0, total=len(sentences.sources))
    targets = teacher.encode_text(sentences.sources)
    progress("teacher", done=len(targets), total=len(targets))
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    student = _student(config, teacher.dim, device)
    tower = SentenceTransformerTower(student, config.student)

    def agreement() -> Agreement:
        student.eval()
        a = _mean_cos(tower.embed([sentences.sources[i] for i in val_src]), targets[val_src])
        b = None
        if val_tr:
            b = _mean_cos(tower.embed([t for t, _ in val_tr]), targets[[i for _, i in val_tr]])
        return Agreement(a, b)

    before = agreement()
    best, best_epoch, best_state, history = _score(before), 0, None, []
    loop = _Loop(student, config, device, len(train))
    for epoch in range(1, config.epochs + 1):
        loss = loop.epoch(train, targets, epoch, rng, progress)
        now = agreement()
        history.append({"epoch": epoch, "loss": loss, "agreement": asdict(now)})
        progress("eval", epoch=epoch, agreement=now)
        if _score(now) > best:
            best, best_epoch = _score(now), epoch
            best_state = copy.deepcopy(student.state_dict())
    if best_state is not None:
        student.load_state_dict(best_state)
    after = Agreement(**history[best_epoch - 1]["agreement"]) if best_epoch else before
    student.eval()
    result = DistillResult(
        out, teacher.identity.spec, config.student, len(train), len(val_src), len(val_tr),
        before, after, best_epoch, history,
    )  # fmt: skip
    if pairs is not None:
        progress("recall", done=0, total=1)
        result.recall_teacher, result.recall_student = _recall(pairs, teacher, tower)
    with quiet_transformers():
        student.save(str(out))
    write_stamp(
        out, teacher.identity, config.student, best_epoch=best_epoch,
        agreement={"before": asdict(before), "after": asdict(after)},
    )  # fmt: skip
    result.seconds = time.perf_counter() - started
    return result


def _check_out(config: DistillConfig) -> Path:
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise UsageError(f"{out} is not empty; use --overwrite to replace it, or another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _score(a: Agreement) -> float:
    """What picks the best epoch: translations count as much as the sentences themselves."""
    return a.sentences if a.translations is None else (a.sentences + a.translations) / 2


def _mean_cos(student: np.ndarray, teacher: np.ndarray) -> float:
    return float(np.mean(np.sum(l2_normalize(student) * l2_normalize(teacher), axis=1)))


def _student(config: DistillConfig, dim: int, device: str):
    """The student model with a fresh Dense layer (no activation) to the teacher's dimension."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Dense

    base = SentenceTransformerTower.load(config.student, device).model
    width = embedding_dimension(base)
    dense = Dense(width, dim, bias=True, activation_function=torch.nn.Identity())
    model = SentenceTransformer(modules=[*base, dense], device=device)
    model.max_seq_length = min(model.max_seq_length or config.max_seq_length, config.max_seq_length)
    return model


class _Loop:
    """AdamW (the fresh head at its own rate), linear warmup then cosine decay, MSE loss."""

    def __init__(self, model, config: DistillConfig, device: str, rows: int):
        import torch

        self.model, self.config, self.device = model, config, device
        head = list(model[-1].parameters())  # the fresh Dense layer
        ids = {id(p) for p in head}
        rest = [p for p in model.parameters() if id(p) not in ids]
        self.opt = torch.optim.AdamW(
            [{"params": rest, "lr": config.lr}, {"params": head, "lr": config.head_lr}],
            weight_decay=0.01,
        )
        self.base = [config.lr, config.head_lr]
        self.per_epoch = math.ceil(rows / config.batch_size)
        self.total = self.per_epoch * config.epochs
        self.warmup = int(config.warmup_fraction * self.total)
        self.step = 0
        tok = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers < 6
        self.tokenize = tok

    def _lr_scale(self) -> float:
        if self.step < self.warmup:
            return (self.step + 1) / self.warmup
        progress = (self.step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    def epoch(self, rows: list[tuple[str, int]], targets: np.ndarray, epoch: int, rng, progress):
        import torch
        from sentence_transformers.util import batch_to_device

        self.model.train()
        order = rng.permutation(len(rows))
        bs, losses = self.config.batch_size, []
        target = torch.from_numpy(np.ascontiguousarray(targets)).to(self.device)
        for s in range(0, len(order), bs):
            batch = [rows[j] for j in order[s : s + bs]]
            feats = batch_to_device(self.tokenize([t for t, _ in batch]), self.device)
            out = self.model(feats)["sentence_embedding"]
            loss = torch.nn.functional.mse_loss(out, target[[i for _, i in batch]])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            for group, base in zip(self.opt.param_groups, self.base, strict=True):
                group["lr"] = base * self._lr_scale()
            self.opt.step()
            self.step += 1
            losses.append(float(loss.detach()))
            progress("step", epoch=epoch, step=self.step, steps=self.total, loss=losses[-1])
        return float(np.mean(losses))


def _recall(pairs: PairSet, teacher: Encoder, tower) -> tuple[Recall, Recall]:
    """Text->image (and image->text) recall on `pairs` with the teacher's caption embeddings and
    with the student's, against the teacher's image embeddings."""
    images = pairs.of(IMAGE)
    if not images.pairs or teacher.image is None:
        raise UsageError("--pairs holds no image pairs to measure recall on")
    files = images.files()
    decoded = decode_images(files, teacher.prep)
    good = {p: a for p, a in zip(files, decoded, strict=True) if not isinstance(a, LoadError)}
    kept = [p for p in images.pairs if p.path in good]
    if not kept:
        raise UsageError("--pairs: no decodable images to measure recall on")
    row = {p: i for i, p in enumerate(good)}
    image_emb = teacher.image.embed(list(good.values()))
    captions = [p.caption for p in kept]
    which = [row[p.path] for p in kept]
    return (
        recall_at_k(image_emb, teacher.encode_text(captions), which),
        recall_at_k(image_emb, tower.embed(captions), which),
    )
