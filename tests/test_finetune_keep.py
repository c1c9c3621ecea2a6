"""Fine-tuning that keeps what it has: frozen features cached across runs and evaluations,
WiSE-FT mixing of base and fine-tuned weights under a forgetting bound, and captions harvested
from sidecars, embedded XMP/IPTC metadata and folder names."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_tiny_model
from test_finetune import CFG16, config, draw_shapes, write_csv

from mmsearch.finetune import evaluate, read_pairs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("base") / "tiny16", cfg=CFG16)


@pytest.fixture
def shapes(tmp_path) -> Path:
    root = tmp_path / "shapes"
    return write_csv(root / "pairs.csv", draw_shapes(root, 40))


def counted(events: list):
    def progress(event, **info):
        if event == "feature_cache":
            events.append((info["tower"], info["hits"], info["computed"]))

    return progress


# --- feature cache ----------------------------------------------------------------------------


def test_second_run_reads_locked_features_back_instead_of_encoding(shapes, base, tmp_path):
    """lock-image: the image tower is frozen, so its features are computed by the first run
    only; a second run with the same base and files encodes nothing and trains the same."""
    import torch

    from mmsearch.finetune import finetune

    cache, pairs = tmp_path / "cache", read_pairs(shapes)
    kw = dict(epochs=1, feature_cache=cache)
    calls = []
    real = torch.nn.Module.__call__

    def spy(self, *a, **k):  # counts forward passes of the image tower
        if type(self).__name__ == "VisionTransformer":
            calls.append(1)
        return real(self, *a, **k)

    def run(out):
        torch.nn.Module.__call__ = spy
        try:
            return finetune(pairs, config(base, out, "lock-image", **kw))
        finally:
            torch.nn.Module.__call__ = real

    first = run(tmp_path / "a")
    assert calls and first.feature_cache["hits"]["image"] == 0
    assert first.feature_cache["computed"]["image"] == first.train_files + first.val_files
    calls.clear()
    again = run(tmp_path / "b")
    assert calls == []
    assert again.feature_cache["computed"]["image"] == 0
    assert again.feature_cache["hits"]["image"] == first.train_files + first.val_files
    a, b = (first.model.state_dict(), again.model.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_shares_the_cache_and_misses_on_changed_weights_or_files(shapes, base, tmp_path):
    from conftest import make_image

    cache = tmp_path / "cache"
    pairs = read_pairs(shapes)
    plain = evaluate(pairs, str(base), device="cpu", precision="fp32")
    events: list = []
    cold = evaluate(pairs, str(base), device="cpu", precision="fp32", feature_cache=cache,
                    progress=counted(events))  # fmt: skip
    n_files, n_caps = cold.images, cold.texts
    assert events == [("image", 0, n_files), ("text", 0, n_caps)]
    for k in (1, 5, 10):  # the cached path ranks as the encoder's own towers do
        assert cold.text_to_image[k] == pytest.approx(plain.text_to_image[k])
        assert cold.image_to_text[k] == pytest.approx(plain.image_to_text[k])
    events.clear()
    warm = evaluate(pairs, str(base), device="cpu", precision="fp32", feature_cache=cache,
                    progress=counted(events))  # fmt: skip
    assert events == [("image", n_files, 0), ("text", n_caps, 0)]
    assert warm == cold
    # an edited file is encoded again (content, not name or time, is the key)
    make_image(pairs.files()[0], pattern=99, size=(32, 32))
    events.clear()
    evaluate(pairs, str(base), device="cpu", precision="fp32", feature_cache=cache,
             progress=counted(events))  # fmt: skip
    assert events == [("image", n_files - 1, 1), ("text", n_caps, 0)]
    # other weights: a namespace of their own
    other = write_tiny_model(tmp_path / "other", seed=3, cfg=CFG16)
    events.clear()
    evaluate(pairs, str(other), device="cpu", precision="fp32", feature_cache=cache,
             progress=counted(events))  # fmt: skip
    assert events == [("image", 0, n_files), ("text", 0, n_caps)]


def test_cache_is_bounded_and_survives_damage(tmp_path):
    import torch

    from mmsearch.finetune.features import FeatureCache

    cache = FeatureCache(tmp_path / "c", max_bytes=3000)
    calls = []

    def compute(rows):
        calls.append(len(rows))
        return torch.arange(len(rows) * 8, dtype=torch.float32).view(len(rows), 8) + rows[0]

    keys = [f"{i:032x}" for i in range(10)]
    a = cache.features("image", "ns", keys, compute)
    b = cache.features("image", "ns", keys, compute)
    assert calls == [10] and torch.equal(a, b)
    for shard in (tmp_path / "c").glob("*/*.safetensors"):
        shard.write_bytes(b"garbage")  # a damaged shard is a miss, not an error
    assert torch.equal(cache.features("image", "ns", keys, compute), a) and calls == [10, 10]
    for n in range(2, 8):  # every shard ~600 bytes: old ones go past 3000 bytes
        cache.features("image", f"ns{n}", keys, compute)
    total = sum(f.stat().st_size for f in (tmp_path / "c").glob("*/*"))
    assert 0 < total <= 3000
    assert not list((tmp_path / "c").glob("image-ns/*.safetensors"))  # the oldest went first
