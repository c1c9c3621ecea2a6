"""Fine-tuning from the command line: pairs in, a model directory out, re-index with it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image, ImageDraw
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.encoders.clap import load_projector

runner = CliRunner()
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 20),
}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_pairs(root: Path) -> Path:
    rows = []
    for name, rgb in COLORS.items():
        for shape in ("square", "circle"):
            for i in range(3):
                img = Image.new("RGB", (32, 32), (255, 255, 255))
                draw = ImageDraw.Draw(img)
                box = (4 + i, 4 + i, 26 - i, 26 - i)
                (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=rgb)
                path = root / "img" / f"{name}_{shape}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(path)
                rows.append({"path": f"img/{path.name}", "caption": f"a {name} {shape}"})
    (root / "img" / "broken.png").write_bytes(b"nope")
    rows.append({"path": "img/broken.png", "caption": "a broken file"})
    rows.append({"path": "img/missing.png", "caption": "a missing file"})
    outside = root.parent / f"{root.name}-outside.png"
    Image.new("RGB", (32, 32), (0, 0, 0)).save(outside)
    rows.append({"path": f"../{outside.name}", "caption": "a file beside the folder"})
    out = root / "pairs.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    return out


def assert_best_epoch_kept(result: dict, epochs: int) -> None:
    """`history` holds the held-out recall before training (epoch 0) and after each epoch;
    `after` is the recall of `best_epoch`, the first epoch with the highest mean (0: no epoch beat
    the model before training, which was kept)."""
    history = result["history"]
    assert [h["epoch"] for h in history] == list(range(epochs + 1))
    assert history[0]["recall"] == result["before"]
    means = [h["recall"]["mean"] for h in history]
    assert result["best_epoch"] == means.index(max(means))
    assert result["after"] == history[result["best_epoch"]]["recall"]


def test_finetune_eval_and_reindex(tiny_model, tmp_path):
    pairs = make_pairs(tmp_path)
    out = tmp_path / "models" / "mine"
    r = cli(
        "finetune", pairs, "--out", out, "--model", tiny_model, "--method", "head",
        "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.25", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["before"]["text_to_image"]
    assert_best_epoch_kept(result, epochs=2)
    assert sum(result["skipped"].values()) == 3
    assert result["skipped"]["outside the pairs file's folder"] == 1
    assert (out / "open_clip_config.json").is_file()
    assert (out / "open_clip_model.safetensors").is_file()

    r = cli("eval", pairs, "--model", out, "--json")
    assert r.exit_code == 0, r.output
    recall = json.loads(r.stdout)
    assert set(recall["image_to_text"]) == {"R@1", "R@5", "R@10"}

    r = cli("index", tmp_path / "img", "--model", tiny_model, "--json")
    assert r.exit_code == 0
    r = cli("index", tmp_path / "img", "--model", out, "--json")
    assert r.exit_code != 0 and "--rebuild" in r.stderr
    r = cli("index", tmp_path / "img", "--model", out, "--rebuild", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["added"] == 24
    info = json.loads(cli("info", "--json").stdout)
    assert info["model"] == f"local-dir:{out.resolve()}"


def test_eval_keeps_pairs_in_their_folder_unless_allowed(tiny_model, tmp_path):
    pairs = make_pairs(tmp_path / "set")
    r = cli("eval", pairs, "--model", tiny_model)
    assert r.exit_code == 0, r.output
    assert (
        "skipped pairs: 1 missing file, 1 outside the pairs file's folder, 1 undecodable "
        "(--allow-outside reads them)" in r.stderr
    )
    r = cli("eval", pairs, "--model", tiny_model, "--allow-outside", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["outside"] == [str(tmp_path / "set-outside.png")]
    assert result["skipped"] == {"missing file": 1, "undecodable": 1}
    r = cli("eval", pairs, "--model", tiny_model, "--allow-outside")
    assert "read 1 files from outside the pairs file's folder: " in r.stderr


def test_finetune_errors(tmp_path, tiny_model):
    r = cli("finetune", tmp_path / "none.csv", "--out", tmp_path / "o", "--model", tiny_model)
    assert r.exit_code != 0 and r.stderr.startswith("mmsearch: error:")
    pairs = make_pairs(tmp_path)
    r = cli("finetune", pairs, "--out", tmp_path / "o", "--model", tiny_model, "--method", "magic")
    assert r.exit_code != 0 and "--method" in r.stderr


def test_finetune_with_separate_validation_pairs(tiny_model, tmp_path):
    pairs = make_pairs(tmp_path)
    rows = pairs.read_text().splitlines()
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("\n".join([rows[0]] + [r for r in rows[1:] if "_2.png" not in r]) + "\n")
    val.write_text("\n".join([rows[0]] + [r for r in rows[1:] if "_2.png" in r]) + "\n")
    out = tmp_path / "m"
    r = cli(
        "finetune", train, "--val", val, "--out", out, "--model", tiny_model,
        "--epochs", "1", "--batch-size", "8", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["val_files"] == 8 and result["train_files"] == 16


def test_audio_pairs_train_the_projector_saved_with_the_model(tiny_model, tmp_path, monkeypatch):
    from test_audio_cli import few_captions, tone
    from test_audio_tower import make_tiny_clap

    few_captions(monkeypatch)
    clap = make_tiny_clap(tmp_path / "clap")
    rows = []
    for k, freq in enumerate([200, 900, 2500, 6000]):
        for i in range(5):
            p = tone(tmp_path / "snd" / f"c{k}_{i}.wav", freq * (1 + 0.02 * i), 1.0)
            rows.append(f"{p},sound number {k}")
    pairs = tmp_path / "audio_pairs.csv"
    pairs.write_text("path,caption\n" + "\n".join(rows) + "\n")
    out = tmp_path / "with-audio"
    r = cli(
        "finetune", pairs, "--out", out, "--model", tiny_model,
        "--audio-model", clap, "--val-fraction", "0.25", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    audio = json.loads(r.stdout)["audio"]
    # Four clearly different tones: the projector fitted on them beats the text bridge on the
    # held-out sounds (0.775 -> 1.0 at the time of writing), so it is the one written.
    assert audio["after"]["mean"] > audio["before"]["mean"] and audio["kept"] == "after"
    assert load_projector(out / "audio_projector.safetensors").meta["method"] == "finetuned"
    assert (out / "audio_projector.safetensors").is_file()
    assert (out / "open_clip_model.safetensors").is_file()
    r = cli("index", tmp_path / "snd", "--model", out, "--audio-model", clap, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(cli("info", "--json").stdout)
    assert info["modalities"]["audio"]["files"] == 20


def test_mixed_image_and_audio_pairs_train_both_and_skip_neither(tiny_model, tmp_path, monkeypatch):
    """Audio pairs beside image pairs train the audio projector; the summary does not also list
    them as skipped (it once said "audio fine-tuning is not available yet" while training them)."""
    from test_audio_cli import few_captions, tone
    from test_audio_tower import make_tiny_clap

    few_captions(monkeypatch)
    clap = make_tiny_clap(tmp_path / "clap")
    pairs = make_pairs(tmp_path / "set")  # 24 image pairs, plus 3 that are skipped
    with open(pairs, "a") as f:
        for k, freq in enumerate([200, 900, 2500, 6000]):
            for i in range(3):
                tone(tmp_path / "set" / "snd" / f"c{k}_{i}.wav", freq * (1 + 0.02 * i), 1.0)
                f.write(f"snd/c{k}_{i}.wav,sound number {k}\n")
    out = tmp_path / "mixed"
    r = cli(
        "finetune", pairs, "--out", out, "--model", tiny_model, "--method", "head",
        "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25", "--audio-model", clap,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    skipped_line = next(line for line in r.stderr.splitlines() if line.startswith("skipped pairs"))
    assert "audio" not in skipped_line
    assert skipped_line.startswith("skipped pairs: ") and skipped_line.count(",") == 2  # 3 kinds
    assert "training pairs (18 files), 6 held out (6 files)" in r.stdout  # the image run
    audio_line = next(line for line in r.stdout.splitlines() if line.startswith("audio: "))
    assert audio_line.startswith("audio: 9 training pairs, 3 held out")
    log = json.loads((out / "training_log.json").read_text())
    assert "audio pair" not in log["data"]["skipped"]
    assert (out / "audio_projector.safetensors").is_file()
