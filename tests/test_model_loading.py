"""How a --model / --audio-model spec resolves, and how it fails: one line that says what to do,
within seconds when the hub is unreachable, and pickle weights refused before anything is
unpickled. The hub is a closed local port and the cache an empty folder: no network is used."""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.config import ModelSpec
from mmsearch.encoders import create_encoder
from mmsearch.errors import ModelError, UsageError

runner = CliRunner()
CLOSED_PORT = "http://127.0.0.1:9"
DEFAULT_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def point_hub_at(monkeypatch, endpoint: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )


@pytest.fixture
def no_hub(tmp_path, monkeypatch) -> Path:
    """An offline machine: the hub endpoint refuses connections, the cache is empty."""
    import open_clip  # noqa: F401 - imported now, not inside the timed calls
    import transformers  # noqa: F401
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    point_hub_at(monkeypatch, CLOSED_PORT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def silent_hub(no_hub, monkeypatch):
    """A hub that accepts connections and never answers; `touched()` says if anyone connected."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.setblocking(False)
    point_hub_at(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")

    def touched() -> bool:
        try:
            server.accept()[0].close()
            return True
        except BlockingIOError:
            return False

    yield touched
    server.close()


def plant_in_cache(cache: Path, repo: str, files: dict[str, Path | bytes]) -> None:
    """Files as huggingface_hub's cache holds them after a download of `repo` at main."""
    commit = "0" * 40
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (snap / name).write_bytes(content)
        else:
            shutil.copy(content, snap / name)


class _Payload:
    """Unpickling this creates the marker file: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_bomb(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"visual.proj": _Payload(marker)}))
    return path


def one_line(r) -> str:
    assert r.exit_code != 0, r.output
    assert r.stderr.startswith("mmsearch: error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


# --- offline first run --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["ViT-B-32", "hf-hub:someone/their-clip"])
def test_unreachable_hub_fails_fast_with_what_to_do(no_hub, spec, capfd):
    capfd.readouterr()
    start = time.monotonic()
    with pytest.raises(ModelError) as e:
        create_encoder(spec, None)
    took = time.monotonic() - start
    msg = str(e.value)
    assert took < 10, f"{took:.1f} s: retries?"  # was ~60 s of back-off
    assert "\n" not in msg
    assert "Hugging Face Hub is unreachable" in msg
    assert "--model DIR" in msg and "HF_HUB_OFFLINE=1" in msg and str(no_hub) in msg
    assert DEFAULT_REPO in msg if spec == "ViT-B-32" else "someone/their-clip" in msg
    assert ".bin" not in msg
    out, err = capfd.readouterr()
    assert "Retrying" not in out + err and "thrown while requesting" not in out + err


def test_hf_hub_offline_says_the_cache_was_used(no_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as e:
        create_encoder("ViT-B-32", None)
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1 is set and it is not in the Hugging Face cache" in msg
    assert str(no_hub) in msg and "--model DIR" in msg and "\n" not in msg


def test_a_cached_model_loads_without_the_network(no_hub, silent_hub, tiny_model):
    plant_in_cache(
        no_hub,
        "someone/tiny",
        {n: tiny_model / n for n in ("open_clip_config.json", "open_clip_model.safetensors")},
    )
    enc = create_encoder("hf-hub:someone/tiny", None)
    assert not silent_hub(), "the hub was contacted although the cache holds the model"
    assert enc.identity.spec == "hf-hub:someone/tiny"
    assert enc.encode_text(["a dog"]).shape == (1, 32)


def test_offline_index_is_one_line(no_hub, media):
    start = time.monotonic()
    err = one_line(cli("index", media))
    assert time.monotonic() - start < 15
    assert "could not download model ViT-B-32:laion2b_s34b_b79k" in err
    assert "--model DIR" in err and "HF_HUB_OFFLINE=1" in err and str(no_hub) in err


def test_unreachable_hub_for_the_audio_model(no_hub):
    from mmsearch.encoders.clap import load_clap

    start = time.monotonic()
    with pytest.raises(ModelError) as e:
        load_clap("laion/clap-htsat-unfused")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "audio model laion/clap-htsat-unfused" in msg and "unreachable" in msg
    assert "--audio-model DIR" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="no such directory"):
        load_clap("./no/such/clap")


# --- what a misspelt --model says ---------------------------------------------------------------


def test_unknown_model_names_close_matches_and_the_forms(tmp_path):
    err = one_line(cli("index", tmp_path, "--model", "bogus"))
    assert "unknown model 'bogus'" in err and "weights tag" not in err
    assert "NAME:TAG" in err and "hf-hub:org/repo" in err and "model directory" in err
    err = one_line(cli("index", tmp_path, "--model", "vit-b-32"))
    assert "unknown model 'vit-b-32' (did you mean ViT-B-32" in err
    err = one_line(cli("index", tmp_path, "--model", "ViT-B-32:laion2b"))
    assert (
        "unknown weights tag 'laion2b' for ViT-B-32 (did you mean laion2b_e16, laion2b_s34b_b79k"
        in err
    )
    err = one_line(cli("index", tmp_path, "--model", "ViT-L-14"))
    assert "ViT-L-14 needs a weights tag (NAME:TAG)" in err


def test_paths_that_are_not_model_directories(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(UsageError, match="is a file; --model takes the model directory"):
        ModelSpec.parse(str(weights))
    with pytest.raises(UsageError, match="model directory not found"):
        ModelSpec.parse(str(tmp_path / "missing"))
    assert ModelSpec.parse(f"ViT-B-32:{weights}").pretrained == str(weights)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights in"):  # not a random-weight model
        create_encoder(str(tmp_path / "empty"), None)


# --- pickle is refused up front -----------------------------------------------------------------


def _refused(e, marker: Path) -> str:
    msg = str(e.value)
    assert not marker.exists(), "the pickle ran"
    assert "\n" not in msg and "safetensors" in msg and "save_file" in msg
    assert "weights_only=False" not in msg
    return msg


def test_pickle_weights_in_a_model_directory_are_refused(tmp_path, tiny_model):
    marker = tmp_path / "PWNED"
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model / "open_clip_config.json", d)
    pickle_bomb(d / "open_clip_pytorch_model.bin", marker)
    with pytest.raises(ModelError) as e:
        create_encoder(str(d), None)
    assert "open_clip_pytorch_model.bin" in _refused(e, marker)
    # a safetensors file beside it does not help: open_clip would pick the .bin first
    shutil.copy(tiny_model / "open_clip_model.safetensors", d / "model.safetensors")
    with pytest.raises(ModelError) as e:
        create_encoder(str(d), None)
    _refused(e, marker)
    err = one_line(cli("index", tmp_path, "--model", d))
    assert "refusing to load" in err and "weights_only=False" not in err
    assert not marker.exists()


def test_pickle_weights_file_as_tag_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    bomb = pickle_bomb(tmp_path / "weights.pt", marker)
    with pytest.raises(ModelError) as e:
        create_encoder(f"ViT-B-32:{bomb}", None)
    _refused(e, marker)


def test_hub_repo_with_only_pickle_weights_is_refused(no_hub, tmp_path, tiny_model):
    marker = tmp_path / "PWNED"
    bomb = pickle_bomb(tmp_path / "bomb.bin", marker)
    plant_in_cache(
        no_hub,
        "someone/pickled",
        {
            "open_clip_config.json": tiny_model / "open_clip_config.json",
            "open_clip_pytorch_model.bin": bomb,
        },
    )
    with pytest.raises(ModelError) as e:
        create_encoder("hf-hub:someone/pickled", None)
    assert "someone/pickled/open_clip_pytorch_model.bin" in _refused(e, marker)


def test_pickle_audio_model_directory_is_refused(tmp_path):
    from mmsearch.encoders.clap import load_clap

    marker = tmp_path / "PWNED"
    d = tmp_path / "clap"
    pickle_bomb(d / "pytorch_model.bin", marker)
    (d / "config.json").write_text('{"model_type": "clap"}')
    with pytest.raises(ModelError) as e:
        load_clap(str(d))
    assert "pytorch_model.bin" in _refused(e, marker)
