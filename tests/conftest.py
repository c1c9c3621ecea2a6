"""Shared fixtures: a tiny random-weight open_clip model written in local-dir layout (the same path
users load fine-tuned models from), an isolated index root, and small media files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_model(out: Path, seed: int = 0, cfg: dict | None = None) -> Path:
    import open_clip
    import torch

    from mmsearch.encoders.clip import save_model_dir

    cfg = json.loads(json.dumps(cfg or TINY_CFG))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    return save_model_dir(model, cfg, out, {"size": cfg["vision_cfg"]["image_size"]})


def write_tiny_bert(out: Path, words, seed: int = 0) -> Path:
    """A tiny random BERT (2 layers, width 32) with a word-piece tokenizer over `words`, saved as
    a Hugging Face model directory: a text tower for composed models."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", ","] + sorted(set(words))
    (out / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(str(out))
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=32),
              add_pooling_layer=False).save_pretrained(str(out))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (`pytestmark = usefixtures(...)`), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "other", seed=1)


def pytest_addoption(parser):
    parser.addoption(
        "--native-bf16",
        action="store_true",
        help="Run as on a CPU with native bf16 (AVX512-BF16/AMX), where precision=auto is bf16.",
    )


@pytest.fixture
def native_bf16():
    """Ask for this to run a test as on a CPU with native bf16, on any machine."""
    return True


@pytest.fixture(autouse=True)
def same_cpu_everywhere(request, monkeypatch):
    """precision=auto picks bf16 on CPUs with native bf16 and fp32 elsewhere, so a test that left
    it to auto would give other numbers on some CI machines. Every test sees a CPU without native
    bf16 unless it asks for `native_bf16` (or the run passes --native-bf16, which shows the tests
    that depend on it). Tests that compare numbers also pin precision="fp32" themselves."""
    import mmsearch.encoders.clip as clip

    native = request.config.getoption("--native-bf16") or "native_bf16" in request.fixturenames
    monkeypatch.setattr(clip, "cpu_has_native_bf16", lambda: native)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own index root through $MMSEARCH_HOME."""
    root = tmp_path / "mmhome"
    monkeypatch.setenv("MMSEARCH_HOME", str(root))
    return root


def make_image(path: Path, color=(255, 0, 0), size=(48, 40), pattern: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pattern is None:
        img = Image.new("RGB", size, color)
    else:
        rng = np.random.default_rng(pattern)
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    img.save(path)
    return path


def smooth_picture(seed: int, size=(160, 120)) -> Image.Image:
    """A photo-like picture: seeded noise upsampled (structure at several scales) plus grain, so
    that a resized or recompressed copy still looks like it, as with real photos."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    grain = rng.integers(-20, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(img, int) + grain, 0, 255).astype(np.uint8))


def make_photo(path: Path, seed: int, size=(160, 120), quality: int = 90, exif=None) -> Path:
    """`smooth_picture(seed)` saved as a JPEG (`exif`: a PIL Image.Exif to embed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"exif": exif} if exif is not None else {}
    smooth_picture(seed, size).save(path, "JPEG", quality=quality, **extra)
    return path


def make_note(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def media(tmp_path) -> Path:
    """A small folder: four distinct photos, a note, a broken image."""
    root = tmp_path / "media"
    for i in range(4):
        make_image(root / "photos" / f"p{i}.jpg", pattern=i, size=(64 + 8 * i, 48))
    make_image(root / "photos" / "nested" / "deep.png", pattern=9)
    make_note(
        root / "notes" / "trip.md", "# Trip\nWe went to the beach.\nThe dog ran after a ball.\n"
    )
    (root / "photos" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def make_tone(
    path: Path, freq: float, seconds: float, seed: int, rate: int = 16000, noise: float = 0.02
) -> Path:
    """A sine tone with a little seeded noise, written as a WAV file."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(len(t))
    sf.write(path, wave.astype(np.float32), rate)
    return path
