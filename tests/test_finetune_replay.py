"""Rehearsal: retention pairs replayed in the training batches (`finetune --replay`), kept apart
from the retention pairs that measure forgetting, and a report of where they came from and what
they cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_tiny_model
from test_finetune import CFG16, config, draw_shapes, write_csv

from mmsearch.finetune import read_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("base") / "tiny16", cfg=CFG16)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    user = write_csv(root / "u" / "pairs.csv", draw_shapes(root / "u", 24, seed=1))
    general = write_csv(root / "g" / "pairs.csv", draw_shapes(root / "g", 16, seed=2))
    return user, general


def run(base, data, out, monkeypatch, retain: bool, **kw):
    """A 2-epoch head run; (its result, per optimizer step the (file, caption) pairs the loss saw).
    The WiSE-FT choice is pinned to the fine-tuned end, so the saved weights are what trained."""
    import numpy as np

    from mmsearch.finetune import finetune, optim, train, wise

    seen, real = [], optim.accumulate

    def spy(encode, micro, split, *rest):
        seen.append([(split.files[split.file_of[i]], split.captions[i])
                     for i in np.concatenate(micro)])  # fmt: skip
        return real(encode, micro, split, *rest)

    monkeypatch.setattr(train, "accumulate", spy)
    monkeypatch.setattr(wise, "choose", lambda curve, max_forgetting: 1.0)
    user, general = data
    result = finetune(
        read_pairs(user), config(base, out, "head", epochs=2, batch_size=8, **kw),
        retain_pairs=read_pairs(general) if retain else None,
    )  # fmt: skip
    return result, seen


def weights(result) -> dict:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def test_replay_puts_retention_pairs_in_the_batches_and_0_trains_as_before(
    base, data, tmp_path, monkeypatch
):
    import torch

    general = set(read_pairs(data[1]).files())
    plain, plain_seen = run(base, data, tmp_path / "a", monkeypatch, retain=False)
    # --replay 0: the retention pairs only measure; training is the run without them, bit for bit
    zero, zero_seen = run(base, data, tmp_path / "b", monkeypatch, retain=True, replay=0)
    assert zero_seen == plain_seen and not general & {f for s in zero_seen for f, _ in s}
    a, b = weights(plain), weights(zero)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert zero.retention.to_dict()["measured"]["files"] == len(general)
    assert zero.retention.to_dict()["replayed"] == {
        "pairs": 0, "files": 0, "fraction": 0, "per_step": 0, "samples": 0,
    }  # fmt: skip

    rep, rep_seen = run(base, data, tmp_path / "c", monkeypatch, retain=True, replay=0.25)
    measured, replayed = set(rep.retention.measure.files), set(rep.retention.replay.files)
    assert measured | replayed == general and not measured & replayed  # split by file
    assert len(measured) == len(replayed) == len(general) // 2
    # every step: 2 of its 8 pairs replayed (0.25 x 8), all from the replayed half
    user_files = set(read_pairs(data[0]).files())
    for step in rep_seen:
        assert sum(f in general for f, _ in step) == 2 and len(step) <= 8
        assert {f for f, _ in step if f in general} <= replayed
        assert {f for f, _ in step if f not in general} <= user_files
    # an epoch is still one pass over the user's training pairs, in more steps
    per_epoch = len(rep_seen) // 2
    assert sorted(p for s in rep_seen[:per_epoch] for p in s if p[0] not in general) == \
        sorted(p for s in plain_seen[: len(plain_seen) // 2] for p in s)  # fmt: skip
    assert per_epoch > len(plain_seen) // 2
    # replayed pairs come in a seeded order, each before any repeats
    first = [p for s in rep_seen[:per_epoch] for p in s if p[0] in general]
    assert len(set(first)) == min(len(first), len(rep.retention.replay.captions))
    report = rep.to_dict()["retention"]
    assert report["replayed"]["samples"] == 2 * len(rep_seen)
    assert report["replayed"]["per_step"] == 2 and report["replayed"]["fraction"] == 0.25
    assert report["measured"]["pairs"] + report["replayed"]["pairs"] == report["pairs"]
    assert report["source"] == "--retain pairs" and report["seconds"] >= 0
    # the forgetting bound is measured on the half that never trained
    assert rep.mix.curve[0]["retention"]["images"] == len(measured)
    c = weights(rep)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_replay_without_retention_pairs_changes_nothing(base, data, tmp_path, monkeypatch):
    import torch

    plain, seen = run(base, data, tmp_path / "a", monkeypatch, retain=False, replay=0)
    again, seen_again = run(base, data, tmp_path / "b", monkeypatch, retain=False, replay=0.5)
    assert seen == seen_again
    a, b = weights(plain), weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.to_dict()["retention"]["source"] is None


def cli(*args):
    from typer.testing import CliRunner

    from mmsearch.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_replay_flag_and_report(base, data, tmp_path, home):
    user, general = data
    args = ["finetune", user, "--model", base, "--epochs", "1", "-b", "8", "--precision",
            "fp32", "--device", "cpu", "--no-plot", "--retain", general]  # fmt: skip
    for bad in ("1", "-0.1"):
        r = cli(*args, "--out", tmp_path / "x", "--replay", bad)
        assert r.exit_code == 2, r.output
        assert r.stderr.strip().splitlines() == ["mmsearch: error: --replay must be in [0, 1)"]
    r = cli(*args, "--out", tmp_path / "m", "--replay", "0.25", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["retention"]
    assert report["source"] == "--retain pairs" and report["files"] == 16
    assert report["measured"]["files"] == report["replayed"]["files"] == 8
    assert report["replayed"]["per_step"] == 2 and report["replayed"]["samples"] > 0
    assert {"seconds", "mix_seconds", "pairs"} <= set(report)
    r = cli(*args, "--out", tmp_path / "t")  # the default --replay, as text
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("retention set: ")]
    assert "from --retain pairs" in line and " s to prepare" in line
    assert "(8 files) measured" in line and "replayed as 0.5 of each batch (4 a step" in line


def test_readme_replay_example_runs(base, data, tmp_path, monkeypatch, home):
    """The README's --replay example, as written, with the tiny model at models/lit."""
    import shutil

    from test_docs import _shell_words, code_blocks

    (block,) = [b for b in code_blocks("### Fine-tuning") if "--replay" in b]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base, tmp_path / "models" / "lit")
    for name, csv in (("pairs.csv", data[0]), ("general.csv", data[1])):
        write_csv(tmp_path / name, [(p.path, p.caption) for p in read_pairs(csv).pairs])
    for line in block.splitlines():
        r = cli(*_shell_words(line, tmp_path)[1:])
        assert r.exit_code == 0, (line, r.output)
        assert "replayed as 0.5 of each batch" in r.stdout
    assert (tmp_path / "models" / "shop" / "open_clip_config.json").is_file()


def test_interrupted_replay_run_resumes_to_the_same_model(base, data, tmp_path):
    import torch

    from mmsearch.errors import UsageError
    from mmsearch.finetune import finetune

    user, general = (read_pairs(p) for p in data)

    def go(out, progress=None, replay=0.5, **kw):
        cfg = config(base, out, "head", epochs=2, batch_size=8, replay=replay, **kw)
        return finetune(user, cfg, progress=progress, retain_pairs=general)

    straight = go(tmp_path / "straight")
    steps = json.loads((straight.out / "training_log.json").read_text())["step_losses"]

    def ctrl_c(event, **info):
        if event == "step" and info["step"] == len(steps) // 2 + 1:  # mid epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "r", ctrl_c, checkpoint_every=1)
    with pytest.raises(UsageError, match="different settings"):
        go(tmp_path / "r", resume=True, replay=0.25)
    resumed = go(tmp_path / "r", resume=True)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    timeless = [{k: v for k, v in r.to_dict()["retention"].items() if "seconds" not in k}
                for r in (straight, resumed)]  # fmt: skip
    assert timeless[0] == timeless[1] and timeless[0]["replayed"]["samples"] == 4 * len(steps)
