"""`finetune --audio-tower head`: CLAP's audio projection head trained with the projector, saved
as a plain transformers model in the model directory, evaluated, indexed and searched with it.

The tiny CLAP here has a 6-d projection head, so with its random head the ten tone classes crowd
together in 6 dimensions and no linear projector can pull them apart; training the head can. The
run happens once per module through the CLI; the tests check what a user relies on afterwards.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import make_tone
from test_audio_tower import make_tiny_clap, make_tiny_clip
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.config import EncoderOptions, ModelSpec
from mmsearch.encoders.clap import (
    AUDIO_MODEL_DIRNAME,
    PROJECTOR_FILENAME,
    FitSettings,
    LogMel,
    load_audio_tower,
    read_captions,
    save_projector,
)

runner = CliRunner()
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def json_of(r) -> dict:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.splitlines()[-1])


def bottleneck_clap(out: Path) -> Path:
    """make_tiny_clap's model with a 6-d projection (same processor files), random weights."""
    import torch
    from transformers import ClapConfig, ClapModel

    make_tiny_clap(out)
    cfg = ClapConfig.from_pretrained(out)
    cfg.projection_dim = cfg.audio_config.projection_dim = cfg.text_config.projection_dim = 6
    torch.manual_seed(0)
    ClapModel(cfg).save_pretrained(out)
    return out


def tone(path: Path, freq: float, seconds: float, seed: int) -> Path:
    return make_tone(path, freq, seconds, seed, noise=0.05)


def write_pairs(path: Path, rows: list[tuple[Path, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows((str(p), c) for p, c in rows)
    return path


def load_dir(model_dir: Path):
    from mmsearch.encoders.clip import load_clip

    return load_clip(
        ModelSpec.parse(str(model_dir)), EncoderOptions(device="cpu", precision="fp32")
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-head")
    clip_dir = make_tiny_clip(root / "clip")
    clap_dir = bottleneck_clap(root / "clap")
    # The model starts with a text-bridge projector fitted on fewer captions and refinement steps
    # than the default (the same code, quicker), as a model directory from an earlier run would.
    bridge = load_audio_tower(
        str(clap_dir),
        load_dir(clip_dir),
        root / "cache",
        captions=read_captions()[::12],
        settings=FitSettings(refine_steps=20),
    )
    save_projector(bridge.projector, clip_dir / PROJECTOR_FILENAME)

    train, val = [], []
    for c, word in enumerate(WORDS):
        for i in range(8):
            split = "val" if i >= 6 else "train"
            (root / split).mkdir(exist_ok=True)
            p = tone(root / split / f"{word}_{i}.wav", 200 * 1.5**c * (1 + 0.02 * (i - 4)),
                     0.5 + 0.1 * i, seed=100 * c + i)  # fmt: skip
            (val if split == "val" else train).append((p, f"the word {word}"))
    bad = [(root / "train" / "gone.wav", "the word zero"), (root / "train" / "zero_0.wav", " ")]
    out = root / "tuned"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMSEARCH_HOME", str(root / "home"))
        data = json_of(
            cli("finetune", write_pairs(root / "train.csv", train + bad), "--model", clip_dir,
                "--out", out, "--audio-model", clap_dir, "--audio-tower", "head",
                "--audio-steps", 150, "--val", write_pairs(root / "val.csv", val), "--json")
        )  # fmt: skip
    return {"root": root, "clip": clip_dir, "clap": clap_dir, "out": out, "audio": data["audio"],
            "skipped": data.get("skipped")}  # fmt: skip


def test_head_lowers_loss_and_beats_the_projector_alone(run):
    audio = run["audio"]
    assert audio["kept"] == "head"
    assert audio["head_loss"]["end"] < audio["head_loss"]["start"]
    assert audio["head"]["mean"] > audio["after"]["mean"] >= audio["before"]["mean"] - 1e-9
    assert (audio["train_pairs"], audio["val_pairs"]) == (60, 20)
    assert run["skipped"] == {"missing file": 1, "empty caption": 1}  # counted, not fatal
    assert audio["head"]["images"] == 20 and audio["head"]["texts"] == 10
    assert Path(audio["audio_model"]) == run["out"] / AUDIO_MODEL_DIRNAME


def test_tuned_tower_loads_in_plain_transformers_with_the_same_embeddings(run):
    import torch
    from transformers import ClapModel, ClapProcessor

    tuned_dir = run["out"] / AUDIO_MODEL_DIRNAME
    tuned = ClapModel.from_pretrained(tuned_dir).eval()
    processor = ClapProcessor.from_pretrained(tuned_dir)
    original = ClapModel.from_pretrained(run["clap"])
    old, new = original.state_dict(), tuned.state_dict()
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith("audio_projection.") for k in changed)  # trunk frozen

    windows = [sf.read(p, dtype="float32")[0] for p in sorted((run["root"] / "val").glob("*"))]
    feats = LogMel(processor.feature_extractor)(windows)
    with torch.no_grad():
        plain = tuned.get_audio_features(
            input_features=feats, is_longer=torch.zeros(len(windows), 1, dtype=torch.bool)
        ).pooler_output.numpy()
    # What `index --model OUT` embeds with: no --audio-model, the model directory's own.
    tower = load_audio_tower(None, load_dir(run["out"]), run["root"] / "no-cache")
    assert tower.identity.spec == f"local-dir:{tuned_dir.resolve()}"
    np.testing.assert_allclose(tower.embed_clap(windows), plain, atol=1e-6)


def test_eval_measures_what_training_measured(run):
    data = json_of(cli("eval", run["root"] / "val.csv", "--model", run["out"], "--json"))
    assert data["audio"] == run["audio"]["head"]
    assert "image_to_text" not in data  # no image pairs: nothing to report for images
    r = cli("eval", run["root"] / "val.csv", "--model", run["out"])
    assert r.exit_code == 0 and "a->t R@1" in r.stdout and "t->a R@10" in r.stdout


def test_index_with_the_model_dir_uses_the_tuned_tower_and_search_finds_recordings(run):
    summary = json_of(cli("index", run["root"] / "val", "--model", run["out"], "--json"))
    assert summary["added"] == 20
    info = json_of(cli("info", "--json"))
    assert info["audio_model"] == f"local-dir:{(run['out'] / AUDIO_MODEL_DIRNAME).resolve()}"
    right = 0
    for word in WORDS:
        hits = [json.loads(x) for x in cli("search", f"the word {word}", "--type", "audio",
                                           "--json", "-k", 1).stdout.splitlines()]  # fmt: skip
        right += Path(hits[0]["path"]).name.startswith(f"{word}_")
    # each recording is one window, so the index ranks exactly as the evaluation did
    assert right / len(WORDS) == pytest.approx(run["audio"]["head"]["text_to_image"]["R@1"])
    assert right >= 5


def test_index_built_with_another_audio_model_is_refused(run, tmp_path):
    base = json_of(cli("index", run["root"] / "val", "--model", run["clip"],
                       "--audio-model", run["clap"], "--json"))  # fmt: skip
    assert base["added"] == 20
    tone(run["root"] / "val" / "extra.wav", 500, 0.5, seed=1)
    try:
        r = cli("index", run["root"] / "val", "--model", run["out"])
    finally:
        (run["root"] / "val" / "extra.wav").unlink()
    assert r.exit_code != 0
    assert "holds audio embedded with" in r.stderr and "from model directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_audio_tower_is_a_one_line_error(run, tmp_path):
    r = cli("finetune", run["root"] / "val.csv", "--out", tmp_path / "x", "--model", run["clip"],
            "--audio-tower", "trunk")  # fmt: skip
    assert r.exit_code != 0 and "--audio-tower" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_eval_of_undecodable_audio_is_a_one_line_error(run, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    pairs = write_pairs(tmp_path / "bad.csv", [(tmp_path / "bad.wav", "the word one")])
    r = cli("eval", pairs, "--model", run["out"])
    assert r.exit_code != 0 and "no decodable audio" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_head_training_is_seeded_and_reproducible():
    """The training loop alone, on made-up pooled features: same seed, same weights and loss."""
    import torch

    from mmsearch.encoders.clap import Projector
    from mmsearch.finetune.audio import HeadSettings, _Set, _train_head
    from mmsearch.finetune.pairs import Pair, PairSet
    from mmsearch.records import AUDIO

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((5, 16))
    feats, pairs = {}, []
    for i in range(40):
        path = Path(f"/made/up/{i}.wav")
        feats[path] = (centers[i % 5] + 0.5 * rng.standard_normal((1 + i % 2, 16))).astype("f4")
        pairs.append(Pair(path, f"class {i % 5}", AUDIO))
    text = {f"class {c}": v for c, v in enumerate(rng.standard_normal((5, 8)).astype("f4"))}
    train, val = _Set(PairSet(pairs[:30]), feats, text), _Set(PairSet(pairs[30:]), feats, text)
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(16, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    start = Projector(rng.standard_normal((3, 8)).astype("f4"), np.zeros(8, "f4"))
    s = HeadSettings(steps=40, batch_size=16, lr=1e-2, eval_every=10, seed=3)
    a = _train_head(head, start, train, val, s, lambda *a, **k: None)
    b = _train_head(head, start, train, val, s, lambda *a, **k: None)
    assert a[3][1] < a[3][0]  # training loss fell
    assert a[3] == b[3] and a[2] == b[2] and a[4] == b[4]
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert torch.equal(a[1].weight, b[1].weight)


def test_window_features_stream_files_window_by_window(run, tmp_path):
    from mmsearch.finetune.audio import window_features
    from mmsearch.loaders.audio import iter_windows

    tower = load_audio_tower(None, load_dir(run["out"]), tmp_path / "cache")
    long = tone(tmp_path / "long.wav", 300, 5.0, seed=2)
    short = sorted((run["root"] / "val").glob("*.wav"))[:3]
    (tmp_path / "bad.wav").write_bytes(b"RIFF junk")
    feats, failed = window_features(tower, [short[0], long, tmp_path / "bad.wav", *short[1:]])
    assert set(failed) == {tmp_path / "bad.wav"} and set(feats) == {long, *short}
    windows = [w for _, _, w in iter_windows(long, tower.loader_settings())]
    assert len(windows) >= 3 and feats[long].shape == (len(windows), 32)
    np.testing.assert_allclose(feats[long], tower.pooled(windows), atol=1e-5)
