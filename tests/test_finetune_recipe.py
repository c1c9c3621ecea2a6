"""The LiT recipe from the command line on tiny towers: compose a model from an image tower and a
text tower, align it (finetune --method head, then lock-image), measure it (eval), index with it;
progress without a terminal; the recall protocol and precision eval reports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_bert
from test_finetune_cli import cli, make_pairs

from mmsearch.finetune.evaluate import recall_at_k, recall_of_captions

WORDS = "a red green blue yellow square circle broken file missing beside the folder".split()


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict:
    """A timm image tower's weights saved under foreign names with a classifier at the end (as
    a port from another library ships them), and a sentence-transformers text model (tiny BERT,
    CLS pooling)."""
    import timm
    import torch

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(1)
    trunk = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    state = {f"port.{i}": t for i, t in enumerate(trunk.state_dict().values())}
    state |= {"port.fc.weight": torch.zeros(10, 4), "port.fc.bias": torch.zeros(10)}
    torch.save(state, root / "effnet.pth")
    st = write_tiny_bert(root / "minibert", WORDS)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    return {"trunk": trunk.state_dict(), "weights": root / "effnet.pth", "text": st}


def compose(towers, out: Path, *extra):
    return cli(
        "compose", "--image", f"timm:test_efficientnet@{towers['weights']}",
        "--text", f"sentence-transformers:{towers['text']}", "--dim", "16",
        "--image-size", "32", "--context-length", "16", "--out", out, *extra,
    )  # fmt: skip


def test_compose_finetune_eval_index(towers, tmp_path):
    from safetensors.torch import load_file

    r = compose(towers, tmp_path / "init", "--json")
    assert r.exit_code == 0, r.output
    composed = json.loads(r.stdout)
    assert "by position" in composed["notes"][0] and "port.fc.weight" in composed["notes"][0]
    cfg = json.loads((tmp_path / "init" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["embed_dim"] == 16
    assert cfg["model_cfg"]["text_cfg"]["hf_pooler_type"] == "cls_pooler"
    assert cfg["preprocess_cfg"]["size"] == [32, 32]
    weights = load_file(str(tmp_path / "init" / "open_clip_model.safetensors"))
    for name, tensor in towers["trunk"].items():  # the image tower holds the file's weights
        assert weights[f"visual.trunk.{name}"].equal(tensor.float()), name
    assert compose(towers, tmp_path / "init").exit_code == 2  # not over an existing model

    pairs, val = make_pairs(tmp_path / "set"), make_pairs(tmp_path / "val")
    common = ["--batch-size", "8", "--val", val, "--allow-outside", "--json"]
    r = cli("finetune", pairs, "--model", tmp_path / "init", "--out", tmp_path / "head",
            "--method", "head", "--epochs", "1", "--lr", "3e-3", *common)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli("finetune", pairs, "--model", tmp_path / "head", "--out", tmp_path / "lit",
            "--method", "lock-image", "--epochs", "1", "--unlocked-text-layers", "1",
            "--warmup-fraction", "0.2", "--one-caption", *common)  # fmt: skip
    assert r.exit_code == 0, r.output
    lit = json.loads(r.stdout)
    after = dict(lit["after"], skipped={})
    assert "9 distinct captions" in lit["warnings"][0]  # 25 held-out images, 9 captions

    # eval measures what finetune reported for the model it kept (same protocol, fp32)
    r = cli("eval", val, "--model", tmp_path / "lit", "--allow-outside", "--json")
    assert r.exit_code == 0, r.output
    measured = json.loads(r.stdout)
    assert measured["precision"] == "fp32" and measured["texts"] == 9
    keys = ("image_to_text", "text_to_image", "images", "texts")
    assert {k: measured[k] for k in keys} == {k: after[k] for k in keys}

    r = cli("index", tmp_path / "set" / "img", "--model", tmp_path / "lit", "--rebuild", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1])["added"] == 24


def test_compose_refuses_towers_in_the_wrong_role(towers, tmp_path):
    r = cli("compose", "--image", f"hf:{towers['text']}", "--text", "hf:x", "--out", tmp_path)
    assert r.exit_code == 2 and "text towers" in r.stderr
    r = cli("compose", "--image", "timm:test_efficientnet@/no/such.pth", "--text", "hf:x",
            "--out", tmp_path / "m")  # fmt: skip
    assert r.exit_code == 2 and "no weights file" in r.stderr


def test_every_flag_an_error_names_exists():
    """Messages of the fine-tuning library name only options the commands have."""
    named = set()
    for f in Path("mmsearch/finetune").glob("*.py"):
        for text in re.findall(r'"[^"\n]*"', f.read_text()):
            named |= set(re.findall(r"--[a-z][a-z-]+", text))
    commands = ("finetune", "compose", "eval", "index", "distill-text")
    helps = "".join(cli(c, "--help").stdout for c in commands)
    offered = set(re.findall(r"--[a-z][a-z-]+", helps))
    assert named and named <= offered, named - offered


def test_progress_lines_without_a_terminal(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_PROGRESS_SECONDS", "0")  # a line per report instead of per 30 s
    pairs = make_pairs(tmp_path)
    args = ["finetune", pairs, "--model", tiny_model, "--epochs", "1", "-b", "8", "--no-plot"]
    r = cli(*args, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    steps = [line for line in r.stderr.splitlines() if "training: step" in line]
    assert steps and re.search(
        r"step 3/3 \(epoch 1\), [\d.]+ samples/s, loss [\d.]+, ETA 0:00", steps[-1]
    )
    assert any("epoch 1/1: training loss" in line for line in r.stderr.splitlines())

    r = cli(*args, "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)  # stdout: the result alone
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    training = [e["progress"] for e in events if e.get("progress", {}).get("stage") == "training"]
    assert training[-1]["done"] == training[-1]["total"] == 3 and "loss" in training[-1]
    assert any(e.get("event") == "epoch" for e in events)

    r = cli("index", tmp_path / "img", "--model", tiny_model)
    assert r.exit_code == 0 and "embedding: 25/25" in r.stderr


def test_progress_repeats_its_line_while_a_stage_runs(capsys):
    from mmsearch.cli.progress import Progress

    with Progress("lines", every=0.05) as progress:
        progress("embed", 3, 10)
        time.sleep(0.4)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all("embedding: 3/10" in line for line in lines)


def test_eval_runs_fp32_unless_asked(tiny_model, tmp_path, monkeypatch, native_bf16):
    """On a CPU with native bf16 (where precision=auto means bf16), eval still measures in fp32."""
    import mmsearch.encoders.clip as clip

    used = []
    pick = clip.pick_dtype
    monkeypatch.setattr(clip, "pick_dtype", lambda *a: used.append(pick(*a)) or used[-1])
    pairs = make_pairs(tmp_path)
    assert cli("eval", pairs, "--model", tiny_model, "--json").exit_code == 0
    assert cli("eval", pairs, "--model", tiny_model, "--precision", "bf16").exit_code == 0
    assert [str(d) for d in used] == ["torch.float32", "torch.bfloat16"]


def test_a_caption_shared_by_several_images_is_one_query():
    """Two classes; image 1 is a cat that looks like a dog. By hand: 'cat' finds image 0 first
    (hit@1); 'dog' finds image 1 (a cat) before its best dog, image 2 (miss@1, hit@2). Images 0
    and 2 rank their own class word first, images 1 and 3 the other one."""
    images = np.array([[1, 0], [0.2, 0.98], [0.6, 0.8], [0.8, 0.6]], dtype=np.float32)
    words = {"cat": [1, 0], "dog": [0, 1]}
    captions = ["cat", "cat", "dog", "dog"]
    texts = np.array([words[c] for c in captions], dtype=np.float32)
    r = recall_of_captions(images, texts, captions, [0, 1, 2, 3])
    assert (r.texts, r.images) == (2, 4)
    assert r.text_to_image[1] == 0.5 and r.image_to_text[1] == 0.5
    assert r.text_to_image[5] == r.image_to_text[5] == 1.0
    # per pair, instance-level: only (cat, image 0) has its own image first
    assert recall_at_k(images, texts, [0, 1, 2, 3]).text_to_image[1] == 0.25
    # chunked scoring gives the same answer
    from mmsearch.finetune.evaluate import recall_shared_captions

    relevant = [(0, 0), (0, 1), (1, 2), (1, 3)]
    one = recall_shared_captions(images, texts[[0, 2]], relevant, chunk=1)
    assert one == r


def test_options_reach_the_config(tiny_model, tmp_path):
    pairs = make_pairs(tmp_path)
    r = cli("finetune", pairs, "--model", tiny_model, "--out", tmp_path / "o",
            "--unlocked-image-layers", "1")  # fmt: skip
    assert r.exit_code == 2 and "--unlocked-image-layers goes with --method lock-image" in r.stderr
    r = cli("finetune", pairs, "--model", tiny_model, "--out", tmp_path / "o",
            "--warmup-fraction", "1.5")  # fmt: skip
    assert r.exit_code == 2 and "--warmup-fraction must be in [0, 1)" in r.stderr


def test_progress_tells_a_stage_that_counts_again(capsys):
    """The held-out files' features after the training files': a new stage, counted from its own
    start (no rate or ETA carried over from the training files)."""
    from mmsearch.cli.progress import Progress

    with Progress("lines", every=0) as progress:  # a line per report
        progress("features", done=4, total=4, tower="image")
        progress("features", done=1, total=2, tower="image")
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "image features (frozen part, once): 4/4",
        "image features (frozen part, once): 1/2",
    ]


def test_compose_takes_the_towers_of_open_clip_models(tiny_model, other_model, tmp_path):
    """Image tower of one model, text tower of another (a CLIP keeps it at the top level, the
    composed model under text.), everything but the projections copied."""
    from safetensors.torch import load_file

    r = cli("compose", "--image", f"open_clip:{tiny_model}:image", "--text",
            f"open_clip:{other_model}:text", "--dim", "8", "--out", tmp_path / "m")  # fmt: skip
    assert r.exit_code == 0, r.output
    got = load_file(str(tmp_path / "m" / "open_clip_model.safetensors"))
    image = load_file(str(tiny_model / "open_clip_model.safetensors"))
    text = load_file(str(other_model / "open_clip_model.safetensors"))
    assert got["visual.proj"].shape == (64, 8) and got["text.text_projection"].shape == (64, 8)
    for key, tensor in image.items():
        if key.startswith("visual.") and key != "visual.proj":
            assert got[key].equal(tensor), key
    for key, tensor in text.items():
        if not key.startswith(("visual.", "logit_")) and key != "text_projection":
            assert got[f"text.{key}"].equal(tensor), key


def test_a_short_run_without_a_terminal_prints_no_progress(capsys):
    """Lines come every `every` seconds of a stage, not at its start: a command that ends (or
    fails) sooner prints only its own output."""
    from mmsearch.cli.progress import Progress

    with Progress("lines", every=30) as progress:
        progress("scan", done=0, total=None)
        progress("features", done=3, total=4, tower="image")
    assert capsys.readouterr().err == ""
