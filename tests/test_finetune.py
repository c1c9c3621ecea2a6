"""Fine-tuning on a synthetic pair set (coloured shapes and their captions) with a tiny random
open_clip model: every method learns, merged outputs reload bit-identically in plain open_clip,
runs repeat exactly on CPU, and an interrupted run resumes to the same result."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_bert, write_tiny_model
from PIL import Image, ImageDraw

from mmsearch.errors import UsageError
from mmsearch.finetune import Recall, read_pairs, recall_at_k
from mmsearch.finetune.pairs import PairSet, split_by_file

COLOURS = {
    "red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230),
    "yellow": (240, 230, 40), "white": (250, 250, 250), "purple": (150, 40, 200),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
# Short context: the synthetic captions are a few tokens, and a short context keeps the test fast.
CFG16 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
LR = {"head": 3e-3, "lora": 3e-3, "lock-image": 1e-3, "full": 1e-3}
EPOCHS = 4


def draw_shapes(root: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n 32x32 images of one coloured shape; every third image gets a second, reworded caption."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape, place = (
            rng.choice(list(COLOURS)),
            rng.choice(SHAPES),
            rng.choice(list(PLACES)),
        )
        img = Image.new("RGB", (32, 32), tuple(rng.randrange(0, 60) for _ in range(3)))
        d = ImageDraw.Draw(img)
        r = 32 * rng.uniform(0.16, 0.22)
        cx = PLACES[place][0] * 32 + rng.uniform(-2, 2)
        cy = PLACES[place][1] * 32 + rng.uniform(-2, 2)
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        name = f"img{i:03d}.png"
        img.save(root / name)
        rows.append((name, f"a {colour} {shape} on the {place}"))
        if i % 3 == 0:
            rows.append((name, f"{place} side: {shape}, {colour}"))
    return rows


def write_csv(path: Path, rows, header=("path", "caption"), delimiter=",") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


# Tiny models run faster on one thread than on two contended ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return write_csv(root / "pairs.csv", draw_shapes(root, 120))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("base") / "tiny16", cfg=CFG16)


def config(base: Path, out: Path, method: str, **kw):
    from mmsearch.finetune import FinetuneConfig

    # fp32 pinned: `auto` is bf16 autocast on CPUs with native bf16, and these tests compare
    # numbers (tests of mixed precision ask for it by name)
    args = dict(
        model=str(base), out=out, method=method, epochs=EPOCHS, batch_size=32, lr=LR[method],
        warmup_steps=2, val_fraction=0.25, device="cpu", precision="fp32", plot=method == "full",
    )  # fmt: skip
    args.update(kw)
    return FinetuneConfig(**args)


@pytest.fixture(scope="module")
def runs(shapes, base, tmp_path_factory):
    """One finished run per method, shared by the tests that inspect it."""
    from mmsearch.finetune import finetune

    done = {}

    def get(method: str):
        if method not in done:
            out = tmp_path_factory.mktemp("runs") / method
            done[method] = finetune(read_pairs(shapes), config(base, out, method))
        return done[method]

    return get


def weights(path: Path) -> dict:
    return weights_file(path / "open_clip_model.safetensors")


def weights_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def probe_inputs():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand(5, 3, 32, 32, generator=g), torch.randint(1, 49000, (5, 16), generator=g)


# --- every method learns, and its merged output reloads exactly -----------------------------------


@pytest.mark.parametrize("method", ["head", "lora", "lock-image", "full"])
def test_method_lowers_loss_raises_recall_and_reloads_identically(runs, method):
    import open_clip
    import torch

    r = runs(method)
    losses = [h["train_loss"] for h in r.history[1:]]
    assert len(losses) == EPOCHS and losses[-1] < losses[0] - 0.1
    assert r.before.mean < 0.2
    assert r.after.mean > r.before.mean + 0.05, (r.before.to_dict(), r.after.to_dict())
    assert r.best_epoch >= 1 and r.after == Recall.from_dict(r.history[r.best_epoch]["recall"])

    # plain open_clip, no mmsearch code: same weights, bit-identical embeddings
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{r.out}")
    model.eval()
    images, tokens = probe_inputs()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), r.model.encode_image(images))
        assert torch.equal(model.encode_text(tokens), r.model.encode_text(tokens))
    mine = r.model.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in model.state_dict().items())


def test_head_folds_into_the_output_projections(runs, base):
    import torch

    tuned, before = weights(runs("head").out), weights(base)
    assert tuned.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], tuned[k])}
    assert changed == {"visual.proj", "text_projection", "logit_scale"}


def test_lock_image_trains_only_the_text_side(runs, base):
    import torch

    tuned, before = weights(runs("lock-image").out), weights(base)
    changed = {k for k in before if not torch.equal(before[k], tuned[k])}
    assert not any(k.startswith("visual.") for k in changed)
    assert "text_projection" in changed and "token_embedding.weight" in changed


def test_lora_merges_into_attention_and_mlp_weights(runs, base):
    import torch

    tuned, before = weights(runs("lora").out), weights(base)
    changed = {k for k in before if not torch.equal(before[k], tuned[k])}
    for tower in ("visual.transformer", "transformer"):
        for layer in (
            "attn.in_proj_weight",
            "attn.out_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        ):
            assert f"{tower}.resblocks.0.{layer}" in changed
    assert changed <= {k for k in before if k.endswith("weight")} | {"logit_scale"}
    assert not any(k.endswith("bias") for k in changed)
    log = json.loads((runs("lora").out / "training_log.json").read_text())
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in log["adapted"]


def test_lora_rank_and_targets_are_configurable(shapes, base, tmp_path):
    import open_clip

    from mmsearch.finetune import finetune
    from mmsearch.finetune.methods import apply_method

    model = open_clip.create_model(f"local-dir:{base}")
    adapted = apply_method(model, "lora", lora_rank=2, lora_targets=("visual.*.c_fc",))
    assert adapted == ["visual.transformer.resblocks.0.mlp.c_fc.weight",
                       "visual.transformer.resblocks.1.mlp.c_fc.weight"]  # fmt: skip
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert trainable["visual.transformer.resblocks.0.mlp.c_fc.parametrizations.weight.0.A"] == (
        2,
        64,
    )
    assert set(trainable) == {"logit_scale"} | {
        f"visual.transformer.resblocks.{i}.mlp.c_fc.parametrizations.weight.0.{m}"
        for i in (0, 1)
        for m in "AB"
    }
    with pytest.raises(UsageError, match="match no linear layer"):
        finetune(read_pairs(shapes), config(base, tmp_path / "o", "lora", lora_targets=("nope",)))


def test_without_matplotlib_no_curve_and_one_note(shapes, base, tmp_path, monkeypatch):
    import sys

    from mmsearch.finetune import finetune

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the `plot` extra were not installed
    events = []
    pairs = PairSet(read_pairs(shapes).pairs[:48])
    r = finetune(
        pairs,
        config(base, tmp_path / "out", "head", epochs=1, plot=True),
        progress=lambda event, **info: events.append((event, info)),
    )
    assert r.curve is None and not (r.out / "curve.png").exists()
    assert r.note == "install mmsearch[plot] for the curve PNG"
    assert r.to_dict()["note"] == r.note and r.to_dict()["curve"] is None
    assert [info for event, info in events if event == "warning"] == []  # said once: the result


def test_curve_leaves_matplotlibs_global_state_alone(tmp_path):
    """The curve is drawn with matplotlib's object API: no backend switch, pyplot not loaded."""
    import subprocess
    import sys

    script = f"""
import sys
import matplotlib
backend = matplotlib.rcParams._get_backend_or_none()
from pathlib import Path
from mmsearch.finetune.checkpoint import TrainState, plot_curve
hist = [{{"epoch": e, "train_loss": None if e == 0 else 1.0 / e,
          "recall": {{d: {{f"R@{{k}}": 0.1 * e for k in (1, 5, 10)}}
                      for d in ("text_to_image", "image_to_text")}}}} for e in range(3)]
st = TrainState(history=hist, step_losses=[1.0, 0.8, 0.6, 0.5], best_epoch=2)
path = plot_curve(st, Path({str(tmp_path / "curve.png")!r}))
assert "matplotlib.pyplot" not in sys.modules
assert matplotlib.rcParams._get_backend_or_none() == backend, backend
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_curve_log_and_mmsearch_loader(runs, shapes):
    import torch

    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders.clip import load_clip
    from mmsearch.finetune import evaluate

    r = runs("full")
    assert r.curve == r.out / "curve.png" and r.curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((r.out / "training_log.json").read_text())
    assert (
        log["finished"] and len(log["history"]) == EPOCHS + 1 and log["best_epoch"] == r.best_epoch
    )
    assert log["config"]["method"] == "full" and log["format_version"] == 1
    assert not (r.out / "checkpoint").exists()

    enc = load_clip(ModelSpec.parse(str(r.out)), EncoderOptions(device="cpu", precision="fp32"))
    captions = ["a red circle on the left", "a blue square on the top"]
    with torch.no_grad():
        mine = torch.nn.functional.normalize(r.model.encode_text(enc.tokenizer(captions)), dim=-1)
    assert np.allclose(enc.encode_text(captions), mine.numpy(), atol=1e-6)

    _, held = split_by_file(read_pairs(shapes), 0.25, seed=0)
    again = evaluate(held, str(r.out), device="cpu", precision="fp32")
    # a caption shared by several held-out files is one query
    assert again.images == r.val_files and again.texts == len({p.caption for p in held.pairs})
    assert r.after.texts == again.texts < r.val_pairs
    assert again.mean == pytest.approx(r.after.mean, abs=0.02)


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> Path:
    """A timm image tower (BatchNorm included) and a Hugging Face BERT text tower with its own
    tokenizer, both tiny and random, composed as one open_clip config and saved as a model dir."""
    import open_clip
    from transformers import BertTokenizerFast

    from mmsearch.encoders.clip import save_model_dir

    root = tmp_path_factory.mktemp("composed")
    words = [w for c in ["a on the side", *COLOURS, *SHAPES, *PLACES] for w in c.split()]
    bert = write_tiny_bert(root / "bert", words)
    cfg = {
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {"timm_model_name": "test_efficientnet", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
        "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert),
                     "hf_model_pretrained": True, "hf_proj_type": "linear",
                     "hf_pooler_type": "mean_pooler", "context_length": 16},
    }  # fmt: skip
    model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    out = save_model_dir(model, cfg, root / "model", {"size": 32})
    BertTokenizerFast.from_pretrained(str(bert)).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("method", ["head", "lora", "lock-image", "full"])
def test_timm_and_hugging_face_towers_train_and_reload_identically(
    composed, shapes, tmp_path, method
):
    import open_clip
    import torch

    from mmsearch.finetune import finetune

    lr = {"head": 3e-3, "lora": 3e-3, "lock-image": 1e-3, "full": 1e-3}[method]
    cfg = config(
        composed, tmp_path / method, method, epochs=2, lr=lr, plot=False, keep_checkpoint=True
    )
    r = finetune(read_pairs(shapes), cfg)
    losses = [h["train_loss"] for h in r.history[1:]]
    assert losses[-1] < losses[0]
    model = open_clip.create_model(f"local-dir:{r.out}").eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{r.out}")(
        ["a red circle on the left", "top side: square"]
    )
    images, _ = probe_inputs()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), r.model.encode_image(images))
        assert torch.equal(model.encode_text(tokens), r.model.encode_text(tokens))
    # what trained: the checkpoint holds exactly the trainable tensors (and trained BN statistics)
    folder = json.loads((r.out / "checkpoint" / "latest.json").read_text())["dir"]
    trained = set(weights_file(r.out / "checkpoint" / folder / "trainable.safetensors"))
    trunk = {k for k in trained if k.startswith("visual.trunk.")}
    if method == "head":
        assert trained == {
            "logit_scale",
            "visual.head.proj.parametrizations.weight.0.delta",
            "text.proj.parametrizations.weight.0.delta",
        }
    elif method == "lora":
        assert (
            "text.transformer.encoder.layer.0.attention.self.query.parametrizations.weight.0.A"
            in trained
        )
        assert (
            "text.transformer.encoder.layer.1.output.dense.parametrizations.weight.0.B" in trained
        )
        assert not trunk  # no linear layers in an EfficientNet trunk: nothing to adapt there
    elif method == "lock-image":
        assert not trunk and "visual.head.proj.weight" in trained  # open_clip keeps the timm head
        assert "text.transformer.embeddings.word_embeddings.weight" in trained
    else:
        assert "visual.trunk.conv_stem.weight" in trunk and "visual.trunk.bn1.running_mean" in trunk
    if method == "lock-image" and r.best_epoch:
        tuned, before = weights(r.out), weights(composed)
        # BatchNorm statistics included: the locked trunk ran in eval mode
        assert all(
            torch.equal(before[k], tuned[k]) for k in before if k.startswith("visual.trunk.")
        )


def test_lock_image_can_unlock_only_the_top_text_blocks(base, composed):
    import open_clip

    from mmsearch.finetune.methods import apply_method

    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    clip = open_clip.create_model(f"local-dir:{base}")
    apply_method(clip, "lock-image", unlocked_text_layers=1)
    assert {n.split(".")[0] for n in trainable(clip)} == {
        "transformer",
        "ln_final",
        "text_projection",
        "logit_scale",
    }
    assert all(
        n.startswith("transformer.resblocks.1.")
        for n in trainable(clip)
        if n.startswith("transformer")
    )
    hf = open_clip.create_model(f"local-dir:{composed}")
    apply_method(hf, "lock-image", unlocked_text_layers=1)
    text = {n for n in trainable(hf) if n.startswith("text.")}
    assert (
        "text.proj.weight" in text
        and "text.transformer.encoder.layer.1.output.dense.weight" in text
    )
    assert not any(".layer.0." in n or "embeddings" in n for n in text)
    with pytest.raises(UsageError, match="between 0 and 2"):
        apply_method(
            open_clip.create_model(f"local-dir:{base}"), "lock-image", unlocked_text_layers=3
        )


def test_feature_cache_and_one_caption_per_file(shapes, base, tmp_path):
    import torch

    from mmsearch.finetune import finetune

    pairs = read_pairs(shapes)
    cache = tmp_path / "cache"
    kw = dict(epochs=1, feature_cache=cache, one_caption_per_file=True)
    events = []
    first = finetune(
        pairs, config(base, tmp_path / "a", "head", **kw), progress=lambda e, **i: events.append(e)
    )
    # one namespace (the frozen text trunk), a shard per split (train, val)
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["text"]
    assert len(list(cache.glob("text-*/*.safetensors"))) == 2
    assert "features" in events
    events.clear()
    again = finetune(
        pairs, config(base, tmp_path / "b", "head", **kw), progress=lambda e, **i: events.append(e)
    )
    assert "features" not in events  # read back, not recomputed
    a, b = weights(first.out), weights(again.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one caption per file: an epoch has as many samples as training files
    steps = json.loads((first.out / "training_log.json").read_text())["step_losses"]
    assert len(steps) == int(np.ceil(first.train_files / 32)) < int(np.ceil(first.train_pairs / 32))
    # A run whose text tower trains still reads the cache while its trunk is unchanged: the
    # evaluation before training. Zeroed cache files make that visible (all scores tie: recall 0).
    from safetensors.torch import load_file, save_file

    for f in cache.glob("*/*.safetensors"):
        shard = load_file(str(f))
        save_file({"keys": shard["keys"], "features": torch.zeros_like(shard["features"])}, str(f))
    locked = finetune(pairs, config(base, tmp_path / "c", "lock-image", **kw))
    assert locked.before.mean == 0 and locked.history[-1]["recall"]["mean"] > 0
    assert len(list(cache.glob("image-*/*.safetensors"))) == 2


# --- training mechanics ----------------------------------------------------------------------------


def test_runs_repeat_exactly_on_cpu(runs, shapes, base, tmp_path):
    import torch

    from mmsearch.finetune import finetune

    first = runs("lora")
    # the same run again, this time decoding images per batch instead of keeping them in memory
    warnings = []
    again = finetune(
        read_pairs(shapes),
        config(base, tmp_path / "again", "lora", image_cache_mb=0),
        progress=lambda e, **i: warnings.append(i["message"]) if e == "warning" else None,
    )
    assert any("decoding per batch" in w for w in warnings)
    a, b = weights(first.out), weights(again.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in again.history]


def test_interrupted_run_resumes_to_the_same_result(shapes, base, tmp_path):
    import open_clip
    import torch

    from mmsearch.finetune import finetune

    pairs = read_pairs(shapes)
    straight = finetune(pairs, config(base, tmp_path / "straight", "head", epochs=2))

    out = tmp_path / "resumed"
    cfg = config(base, out, "head", epochs=2, checkpoint_every=1)
    steps_per_epoch = int(np.ceil(straight.train_pairs / 32))

    def ctrl_c(event, **info):
        if event == "step" and info["step"] == steps_per_epoch + 2:  # mid epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(pairs, cfg, progress=ctrl_c)
    latest = json.loads((out / "checkpoint" / "latest.json").read_text())["dir"]
    assert latest.startswith(f"step-{steps_per_epoch + 1:08d}")
    open_clip.create_model(f"local-dir:{out}")  # the best model so far is a complete model dir
    (out / "checkpoint" / "step-99999999-abc.partial").mkdir()  # debris of a write cut short

    with pytest.raises(UsageError, match="--resume"):
        finetune(pairs, cfg)
    with pytest.raises(UsageError, match="different settings"):
        finetune(pairs, config(base, out, "head", epochs=2, resume=True, lr=1e-2))
    events = []
    resumed = finetune(pairs, config(base, out, "head", epochs=2, resume=True),
                       progress=lambda e, **i: events.append((e, i)))  # fmt: skip
    assert ("resume", {"epoch": 1, "step": steps_per_epoch + 1}) in events
    a, b = weights(straight.out), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def no_time(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert no_time(resumed.history) == no_time(straight.history)
    with pytest.raises(UsageError, match="already finished"):
        finetune(pairs, config(base, out, "head", epochs=2, resume=True))


def test_run_killed_before_its_first_checkpoint_can_be_rerun_or_resumed(shapes, base, tmp_path):
    """Killed before its first checkpoint, a run left a model and an unfinished log but nothing
    to resume: --resume said "no checkpoint", a plain rerun said "use --resume". Both now start
    it over and say so; a finished or foreign model is still not overwritten."""
    from mmsearch.finetune import finetune

    pairs = read_pairs(shapes)
    out = tmp_path / "killed"
    cfg = dict(epochs=1, plot=False)

    def kill_at_first_step(event, **info):
        if event == "step":
            raise KeyboardInterrupt

    def killed_run(**kw):
        with pytest.raises(KeyboardInterrupt):
            finetune(pairs, config(base, out, "head", **cfg, **kw), progress=kill_at_first_step)
        assert (out / "open_clip_config.json").is_file() and not (out / "checkpoint").exists()

    killed_run()
    warnings = []
    resumed = finetune(
        pairs, config(base, out, "head", resume=True, **cfg),
        progress=lambda e, **i: warnings.append(i["message"]) if e == "warning" else None,
    )  # fmt: skip
    assert resumed.note == f"no checkpoint to resume in {out}: started from the beginning"
    assert warnings == [resumed.note] and resumed.to_dict()["note"] == resumed.note
    assert json.loads((out / "training_log.json").read_text())["finished"]

    killed_run(overwrite=True)
    rerun = finetune(pairs, config(base, out, "head", **cfg))
    assert rerun.note == f"{out} held a run stopped before its first checkpoint: started it over"
    a, b = weights_file(out / "open_clip_model.safetensors"), resumed.model.state_dict()
    assert all(torch_equal(a[k], b[k]) for k in a)  # the same run as the resumed one

    with pytest.raises(UsageError, match="already holds a fine-tuned model; use --overwrite"):
        finetune(pairs, config(base, out, "head", **cfg))
    with pytest.raises(UsageError, match="already finished; nothing to resume"):
        finetune(pairs, config(base, out, "head", resume=True, **cfg))
    foreign = tmp_path / "foreign"
    write_tiny_model(foreign)
    for kw in ({}, {"resume": True}):
        with pytest.raises(UsageError, match="model"):
            finetune(pairs, config(base, foreign, "head", **cfg, **kw))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_learns_keeps_fp32_weights_and_resumes(shapes, base, tmp_path, precision):
    """The path `--precision auto` takes on CUDA (autocast; fp16 with loss scaling), run here
    through CPU autocast with the same code."""
    import torch

    from mmsearch.finetune import finetune

    pairs = read_pairs(shapes)
    straight = finetune(pairs, config(base, tmp_path / "straight", "full", precision=precision))
    losses = [h["train_loss"] for h in straight.history[1:]]
    assert losses[-1] < losses[0] - 0.1
    assert straight.after.mean > straight.before.mean + 0.05
    saved = weights(straight.out)
    assert {v.dtype for v in saved.values()} == {torch.float32}  # master weights stay fp32

    out = tmp_path / "resumed"
    steps_per_epoch = int(np.ceil(straight.train_pairs / 32))

    def ctrl_c(event, **info):
        if event == "step" and info["step"] == steps_per_epoch + 2:
            raise KeyboardInterrupt

    cfg = dict(precision=precision, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        finetune(pairs, config(base, out, "full", **cfg), progress=ctrl_c)
    finetune(pairs, config(base, out, "full", resume=True, **cfg))
    resumed = weights(out)
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_cuda_mixed_precision_learns_and_reloads_on_cpu(shapes, base, tmp_path, precision):
    import open_clip
    import torch

    from mmsearch.finetune import finetune

    r = finetune(
        read_pairs(shapes),
        config(base, tmp_path / "cuda", "lora", device="cuda", precision=precision),
    )
    losses = [h["train_loss"] for h in r.history[1:]]
    assert losses[-1] < losses[0] - 0.1
    assert r.after.mean > r.before.mean + 0.05
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{r.out}")
    images, tokens = probe_inputs()
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(images), r.model.encode_image(images))


def test_numeric_tests_pin_precision_against_native_bf16_cpus(native_bf16):
    """On a CPU with native bf16 (AVX512-BF16/AMX; simulated here) precision=auto is bf16, which
    moves fine-tuned weights by ~1e-3: the tests that compare numbers pin fp32."""
    import torch

    from mmsearch.encoders.clip import pick_dtype
    from mmsearch.finetune.optim import autocast_dtype

    assert autocast_dtype("cpu", "auto") == torch.bfloat16
    assert pick_dtype("cpu", "auto") == torch.bfloat16
    assert autocast_dtype("cpu", config(Path("base"), Path("out"), "full").precision) is None


def test_grad_accumulation_matches_one_big_batch(shapes, base, tmp_path, native_bf16):
    """Run as on a CPU with native bf16, where it once failed (0.0015 vs 1e-4) under auto."""
    from mmsearch.finetune import finetune

    pairs = read_pairs(shapes)
    big = finetune(
        pairs, config(base, tmp_path / "big", "full", epochs=1, batch_size=32, plot=False)
    )
    acc = finetune(pairs, config(base, tmp_path / "acc", "full", epochs=1, batch_size=16, grad_accum=2,
                                 plot=False))  # fmt: skip
    big_log = json.loads((big.out / "training_log.json").read_text())["step_losses"]
    acc_log = json.loads((acc.out / "training_log.json").read_text())["step_losses"]
    assert len(big_log) == len(acc_log)
    assert big_log[0] == pytest.approx(acc_log[0], abs=1e-5)  # the same full-batch loss
    a, b = weights(big.out), weights(acc.out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_gradient_checkpointing_gives_the_same_training(shapes, base, tmp_path):
    import torch

    from mmsearch.finetune import finetune

    pairs = read_pairs(shapes)
    plain = finetune(pairs, config(base, tmp_path / "plain", "lora", epochs=1))
    ckpt = finetune(
        pairs, config(base, tmp_path / "ckpt", "lora", epochs=1, grad_checkpointing=True)
    )
    a, b = weights(plain.out), weights(ckpt.out)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bad_pairs_are_skipped_with_counts(tmp_path, base):
    from mmsearch.finetune import finetune

    rows = draw_shapes(tmp_path / "media", 12, seed=3)
    (tmp_path / "media" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "media" / "clip.wav").write_bytes(b"RIFF....WAVE")
    (tmp_path / "media" / "table.xyz").write_text("?")
    rows += [
        ("broken.png", "a broken picture"),
        ("gone.png", "a file that is not there"),
        ("img000.png", "   "),
        ("clip.wav", "a dog barking"),
        ("table.xyz", "not media"),
    ]
    pairs = read_pairs(write_csv(tmp_path / "media" / "pairs.csv", rows))
    assert pairs.skipped_counts() == {
        "missing file": 1,
        "empty caption": 1,
        "unsupported file type": 1,
    }
    r = finetune(pairs, config(base, tmp_path / "out", "head", epochs=1, val_fraction=0.3))
    # the audio pair is not skipped: finetune.audio trains it
    assert r.skipped == {
        "missing file": 1, "empty caption": 1, "unsupported file type": 1, "undecodable": 1,
    }  # fmt: skip
    assert r.train_files + r.val_files == 12
    log = json.loads((r.out / "training_log.json").read_text())
    assert any("gone.png" in s["reason"] for s in log["data"]["skipped_examples"])


def test_pairs_stay_in_the_pairs_files_folder(tmp_path):
    """A pairs file reads files beside it. `../` out of its folder is skipped (counted) unless
    allow_outside; absolute paths are read but listed, like everything used from outside."""
    from conftest import make_image

    from mmsearch.finetune.pairs import OUTSIDE

    data = tmp_path / "data"
    inside = make_image(data / "img" / "a.png")
    private = make_image(tmp_path / "private" / "b.png")
    elsewhere = make_image(tmp_path / "elsewhere" / "c.png")
    rows = [
        ("img/a.png", "inside"),
        ("img/../img/a.png", "still inside"),
        ("../private/b.png", "up and out"),
        (str(elsewhere), "absolute"),
    ]
    csv_file = write_csv(data / "pairs.csv", rows)
    jsonl = data / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows))
    for source in (csv_file, jsonl):
        kept = read_pairs(source)
        assert [p.path for p in kept.pairs] == [inside, inside, elsewhere]
        assert kept.skipped_counts() == {OUTSIDE: 1}
        assert kept.skipped[0].reason == "outside the pairs file's folder: ../private/b.png"
        assert kept.outside == [elsewhere]
        allowed = read_pairs(source, allow_outside=True)
        assert [p.path for p in allowed.pairs] == [inside, inside, private, elsewhere]
        assert not allowed.skipped and allowed.outside == [private, elsewhere]


def test_config_is_checked_at_the_edge(tmp_path, base, shapes):
    from mmsearch.finetune import FinetuneConfig, finetune

    for bad in ({"method": "magic"}, {"epochs": 0}, {"batch_size": 1}, {"val_fraction": 1.0},
                {"grad_accum": 0}, {"precision": "fp8"}, {"unlocked_text_layers": 1}):  # fmt: skip
        with pytest.raises(UsageError):
            FinetuneConfig(model=str(base), out=tmp_path / "o", **bad)
    with pytest.raises(UsageError, match="differ from the model directory"):
        finetune(read_pairs(shapes), config(base, base, "head"))
    with pytest.raises(UsageError, match="too few"):
        finetune(read_pairs(shapes), config(base, tmp_path / "o", "head", val_fraction=0.0))


# --- pure parts: pairs, split, recall, loss ---------------------------------------------------------


def test_read_pairs_from_csv_tsv_jsonl_and_sidecar_folder(tmp_path):
    media = tmp_path / "media"
    rows = draw_shapes(media, 3)
    sub = tmp_path / "lists"
    sub.mkdir()
    # CSV in another folder: relative paths resolve against the file's own folder (leading out
    # of it with ../ takes allow_outside, see test_pairs_stay_in_the_pairs_files_folder)
    rel = [(f"../media/{p}", c) for p, c in rows]
    csv_set = read_pairs(
        write_csv(sub / "p.csv", rel, header=("Image", "Text")), allow_outside=True
    )
    assert [p.caption for p in csv_set.pairs] == [c for _, c in rows]
    assert (
        csv_set.pairs[0].path == (media / rows[0][0]).resolve()
        and csv_set.pairs[0].modality == "image"
    )
    swapped = [(c, p) for p, c in rel[:2]]
    tsv = read_pairs(
        write_csv(sub / "p.tsv", swapped, header=("caption", "filepath"), delimiter="\t"),
        allow_outside=True,
    )
    assert [p.caption for p in tsv.pairs] == [c for _, c in rows[:2]]
    headerless = read_pairs(write_csv(media / "h.csv", rows, header=None))
    assert len(headerless) == len(rows)
    named = read_pairs(write_csv(media / "n.csv", [(c, p) for p, c in rows], header=("a", "b")),
                       path_key="b", caption_key="a")  # fmt: skip
    assert len(named) == len(rows)
    with pytest.raises(UsageError, match="no caption column"):
        read_pairs(write_csv(media / "x.csv", rows, header=("path", "whatever")))

    lines = [json.dumps({"file": rows[0][0], "captions": ["one", "two"]}), "{broken",
             json.dumps({"file": rows[1][0], "captions": "three"})]  # fmt: skip
    (media / "p.jsonl").write_text("\n".join(lines) + "\n")
    js = read_pairs(media / "p.jsonl")
    assert [p.caption for p in js.pairs] == ["one", "two", "three"]
    assert js.skipped_counts() == {"unreadable row": 1} and js.skipped[0].where == "p.jsonl:2"

    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    (folder / "a.txt").write_text("a black\n square  ")
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not a caption of anything")
    fs = read_pairs(folder)
    assert [(p.path.name, p.caption) for p in fs.pairs] == [("a.jpg", "a black square")]
    assert fs.skipped_counts() == {"no caption file": 1}
    with pytest.raises(UsageError):
        read_pairs(tmp_path / "nope.csv")


def test_split_keeps_each_files_captions_together(shapes):
    pairs = read_pairs(shapes)
    train, held = split_by_file(pairs, 0.25, seed=0)
    assert not set(train.files()) & set(held.files())
    assert len(train) + len(held) == len(pairs)
    assert len(held.files()) == 30
    again, _ = split_by_file(pairs, 0.25, seed=0)
    assert again.pairs == train.pairs
    other, _ = split_by_file(pairs, 0.25, seed=1)
    assert other.pairs != train.pairs
    one = PairSet(pairs.pairs[:1])
    assert split_by_file(one, 0.5)[1].pairs == []


def test_recall_counts_both_directions_and_ties_against_the_model():
    eye = np.eye(4, dtype=np.float32)
    # captions 0,1 -> image 0; 2 -> image 1; 3 -> image 2; 4 -> image 3
    text = np.stack([eye[0], eye[0], eye[1], eye[2], eye[3]])
    r = recall_at_k(eye, text, [0, 0, 1, 2, 3])
    assert r.text_to_image == {1: 1.0, 5: 1.0, 10: 1.0} and r.image_to_text[1] == 1.0
    assert (r.images, r.texts) == (4, 5)
    swapped = recall_at_k(eye, text, [1, 1, 0, 2, 3])  # captions 0-2 point at the wrong image
    assert swapped.text_to_image[1] == pytest.approx(2 / 5)
    assert swapped.image_to_text[1] == pytest.approx(2 / 4)
    collapsed = recall_at_k(np.ones((4, 4), np.float32) / 2, text, [0, 0, 1, 2, 3])
    assert collapsed.text_to_image[1] == 0.0 and collapsed.image_to_text[1] == 0.0
    assert collapsed.text_to_image[5] == 1.0  # 4 images: everything is within 5
    assert Recall.from_dict(r.to_dict()) == r


def test_symmetric_infonce_matches_open_clip_and_masks_shared_files():
    import torch
    from open_clip.loss import ClipLoss

    from mmsearch.losses import clip_loss

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(10.0)
    n = torch.nn.functional.normalize
    ref = ClipLoss()(n(img, dim=-1), n(txt, dim=-1), scale)
    assert torch.allclose(clip_loss(img, txt, scale), ref, atol=1e-6)
    # rows 0 and 1 are two captions of one file: neither is the other's negative
    txt[1] = txt[0]
    groups = torch.tensor([0, 0, 1, 2, 3, 4])
    masked = clip_loss(img, txt, scale, groups)
    assert torch.isfinite(masked) and masked < clip_loss(img, txt, scale)
    assert torch.allclose(clip_loss(img, txt, scale, torch.arange(6)), clip_loss(img, txt, scale))
