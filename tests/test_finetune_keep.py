"""Fine-tuning that keeps what it has: frozen features cached across runs and evaluations,
WiSE-FT mixing of base and fine-tuned weights under a forgetting bound, and captions harvested
from sidecars, embedded XMP/IPTC metadata and folder names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_model
from test_finetune import CFG16, config, draw_shapes, write_csv

from mmsearch.finetune import evaluate, read_pairs

# Tiny models run faster on one thread than on two contended ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    n_files, n_caps = cold.images, len(pairs)  # every caption runs (texts: distinct ones)
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


# --- WiSE-FT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["head", "lock-image"])
def test_mix_at_0_and_1_is_base_and_fine_tuned_bit_for_bit(base, method):
    import open_clip
    import torch

    from mmsearch.finetune.methods import apply_method, merged_state_dict, trainable_state
    from mmsearch.finetune.wise import mix_state

    model = open_clip.create_model(f"local-dir:{base}")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_method(model, method)
    start = {k: v.clone() for k, v in trainable_state(model).items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands in for training: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    tuned = {k: v.clone() for k, v in trainable_state(model).items()}

    def merged():  # a copy: the state dict's tensors are the live weights
        return {k: v.clone() for k, v in merged_state_dict(model).items()}

    tuned_sd = merged()
    model.load_state_dict(mix_state(start, tuned, 0.0), strict=False)
    at0 = merged()
    model.load_state_dict(mix_state(start, tuned, 1.0), strict=False)
    at1 = merged()
    assert set(at0) == set(base_sd)
    assert [k for k in base_sd if not torch.equal(at0[k], base_sd[k])] == []
    assert all(torch.equal(at1[k], tuned_sd[k]) for k in tuned_sd)
    assert any(not torch.equal(tuned_sd[k], base_sd[k]) for k in base_sd)
    model.load_state_dict(mix_state(start, tuned, 0.5), strict=False)
    half = merged()
    moved = [k for k in base_sd if not torch.equal(tuned_sd[k], base_sd[k])]
    assert all(not torch.equal(half[k], base_sd[k]) for k in moved)


def recall_row(alpha: float, target: float, retained: float, base_retained: float) -> dict:
    from mmsearch.finetune import Recall

    def r(v):
        return Recall({1: v, 5: v, 10: v}, {1: v, 5: v, 10: v}, 10, 10).to_dict()

    return {"alpha": alpha, "target": r(target), "retention": r(retained),
            "forgetting": max(0.0, 1 - retained / base_retained)}  # fmt: skip


def test_choice_keeps_retention_within_max_forgetting():
    from mmsearch.finetune.wise import choose

    # target recall rises with alpha while retention falls: 0.50 -> 0.30 at alpha 1
    curve = [recall_row(a, 0.2 + 0.5 * a, 0.5 - 0.2 * a * a, 0.5) for a in (0, 0.25, 0.5, 0.75, 1)]
    assert choose(curve, 1.0) == 1  # no bound: the fine-tuned model
    assert choose(curve, 0.05) == 0.25  # 0.5 -> 0.4875 (2.5%); 0.5 costs 10%
    assert choose(curve, 0.10) == 0.5
    assert choose(curve, 0.0) == 0  # only the base keeps everything
    # a mix that beats both ends on the target (the WiSE-FT effect) is taken
    bump = [recall_row(a, t, 0.5, 0.5) for a, t in ((0, 0.2), (0.5, 0.7), (1, 0.6))]
    assert choose(bump, 0.05) == 0.5


def test_finetune_with_retention_pairs_reports_and_saves_the_chosen_mix(base, tmp_path):
    import torch

    from mmsearch.finetune import finetune
    from mmsearch.finetune.checkpoint import load_weights

    user = write_csv(tmp_path / "u" / "pairs.csv", draw_shapes(tmp_path / "u", 40, seed=1))
    general = write_csv(tmp_path / "g" / "pairs.csv", draw_shapes(tmp_path / "g", 24, seed=2))
    events = []
    result = finetune(
        read_pairs(user), config(base, tmp_path / "m", "head", epochs=2, max_forgetting=0.0),
        retain_pairs=read_pairs(general), progress=lambda e, **i: events.append(e),
    )  # fmt: skip
    mix = result.mix
    assert mix.measured and events.count("mix") == 11
    assert [r["alpha"] for r in mix.curve] == [i / 10 for i in range(11)]
    chosen = mix.row(mix.alpha)
    assert chosen["forgetting"] == 0  # max_forgetting 0: nothing lost on the retention pairs
    report = result.to_dict()["wise"]
    assert set(report["target"]) == set(report["retention"]) == {"base", "fine-tuned", "mix"}
    assert report["retention"]["mix"]["mean"] >= report["retention"]["base"]["mean"] - 1e-6
    # the saved model is the mix: its recall on the retention pairs that measure (the others
    # are replayed in training, --replay) is the one reported for it
    from mmsearch.finetune import PairSet

    measured = set(result.retention.measure.files)
    assert 0 < len(measured) < len(read_pairs(general).files())
    measured_pairs = PairSet([p for p in read_pairs(general).pairs if p.path in measured])
    saved = evaluate(measured_pairs, str(result.out), device="cpu", precision="fp32")
    assert saved.mean == pytest.approx(Recall_mean(report["retention"]["mix"]), abs=1e-6)
    weights = load_weights(result.out / "open_clip_model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in result.model.state_dict().items())


def Recall_mean(d: dict) -> float:
    from mmsearch.finetune import Recall

    return Recall.from_dict(d).mean


def test_without_retention_pairs_the_report_says_so(shapes, base, tmp_path):
    from mmsearch.finetune import finetune

    result = finetune(read_pairs(shapes), config(base, tmp_path / "m", "head", epochs=1))
    assert result.mix.alpha == 1 and not result.mix.measured
    assert "retention not measured" in result.to_dict()["wise"]["note"]


# --- captions the user already has ------------------------------------------------------------

XMP = """<?xpacket begin='' id='W5M0MpCehiHzreSzNTczkc9d'?>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">
<dc:description><rdf:Alt><rdf:li xml:lang="de">Ein Hund am Strand</rdf:li>
<rdf:li xml:lang="x-default">A dog running on the beach</rdf:li></rdf:Alt></dc:description>
<dc:subject><rdf:Bag><rdf:li>dog</rdf:li><rdf:li>beach</rdf:li><rdf:li>summer</rdf:li></rdf:Bag>
</dc:subject></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end='w'?>"""


def with_iptc(path: Path, records: list[tuple[int, bytes]]) -> Path:
    """Put an IPTC IIM record (Photoshop APP13 resource 0x0404) into a JPEG, as cameras and
    photo managers write it."""
    import struct

    iim = b"".join(b"\x1c\x02" + bytes([n]) + struct.pack(">H", len(v)) + v for n, v in records)
    iim += b"\0" * (len(iim) % 2)
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\0\0" + struct.pack(">I", len(iim)) + iim
    body = b"Photoshop 3.0\0" + resource
    data = path.read_bytes()
    path.write_bytes(data[:2] + b"\xff\xed" + struct.pack(">H", len(body) + 2) + body + data[2:])
    return path


def test_captions_from_xmp_iptc_sidecars_and_folder_names(tmp_path):
    from conftest import make_photo
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    root = tmp_path / "Photos"
    make_photo(root / "Beach_2019" / "dog.jpg", seed=1)
    Image.open(root / "Beach_2019" / "dog.jpg").save(root / "Beach_2019" / "xmp.jpg",
                                                     xmp=XMP.encode())  # fmt: skip
    png_info = PngInfo()
    png_info.add_itxt("XML:com.adobe.xmp", XMP.replace("A dog running", "A dog resting"))
    (root / "png").mkdir()
    Image.open(root / "Beach_2019" / "dog.jpg").save(root / "png" / "x.png", pnginfo=png_info)
    with_iptc(make_photo(root / "city-trip" / "iptc.jpg", seed=2), [
        (120, b"Tower bridge at night"), (25, b"london"), (25, "caf\xe9".encode()),
    ])  # fmt: skip
    make_photo(root / "loose.jpg", seed=3)
    (root / "loose.txt").write_text("a loose photo\n")

    def caps(sources):
        pairs = read_pairs(root, captions_from=sources)
        got = {}
        for p in pairs.pairs:
            got.setdefault(p.path.relative_to(root).as_posix(), []).append(p.caption)
        return got, pairs.skipped_counts()

    xmp, skipped = caps(("xmp",))
    assert xmp == {
        "Beach_2019/xmp.jpg": ["A dog running on the beach", "Ein Hund am Strand",
                               "dog, beach, summer"],
        "png/x.png": ["A dog resting on the beach", "Ein Hund am Strand", "dog, beach, summer"],
        "city-trip/iptc.jpg": ["Tower bridge at night", "london, café"],
    }  # fmt: skip
    assert skipped == {"no caption": 2}  # dog.jpg and loose.jpg carry none
    folders, _ = caps(("folders",))
    assert folders == {
        "Beach_2019/dog.jpg": ["beach 2019"], "Beach_2019/xmp.jpg": ["beach 2019"],
        "png/x.png": ["png"], "city-trip/iptc.jpg": ["city trip"],
    }  # fmt: skip
    every, skipped = caps(("sidecar", "xmp", "folders"))
    assert every["loose.jpg"] == ["a loose photo"] and not skipped
    assert every["city-trip/iptc.jpg"] == ["Tower bridge at night", "london, café", "city trip"]
    sidecar, skipped = caps(("sidecar",))  # the default: as before
    assert sidecar == {"loose.jpg": ["a loose photo"]} and skipped == {"no caption file": 4}


# --- from the command line --------------------------------------------------------------------


def test_cli_folder_captions_retention_and_default_feature_cache(base, tmp_path, home):
    import json

    from conftest import make_image
    from typer.testing import CliRunner

    from mmsearch.cli import app

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    photos = tmp_path / "library"
    for i in range(16):  # four folders of four photos: the folder name is the caption
        make_image(photos / ["red_car", "blue-sky", "old dog", "new cat"][i % 4] / f"{i}.png",
                   pattern=i, size=(32, 32))  # fmt: skip
    general = write_csv(tmp_path / "g" / "pairs.csv", draw_shapes(tmp_path / "g", 12, seed=5))
    args = ["finetune", photos, "--captions-from", "folders", "--model", base, "--epochs", "1",
            "-b", "8", "--val-fraction", "0.25", "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    r = cli(*args, "--out", tmp_path / "m1", "--retain", general, "--max-forgetting", "0.1",
            "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["train_pairs"] + out["val_pairs"] == 16
    assert set(out["wise"]["retention"]) == {"base", "fine-tuned", "mix"}
    assert out["feature_cache"]["computed"]["text"] > 0
    shards = list((home / ".models" / "features").glob("text-*/*.safetensors"))
    assert shards  # the default place: beside the index root's cached models
    r = cli(*args, "--out", tmp_path / "m2", "--json")
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert again["feature_cache"]["computed"] == {"text": 0}  # read back, not encoded
    assert "retention not measured" in again["wise"]["note"]
    r = cli(*args, "--out", tmp_path / "m3", "--no-feature-cache")
    assert r.exit_code == 0, r.output
    assert "retention not measured" in r.output
    assert list((home / ".models" / "features").glob("text-*/*.safetensors")) == shards
    r = cli("finetune", photos, "--captions-from", "exif", "--out", tmp_path / "m4")
    assert r.exit_code != 0 and "unknown caption source exif" in r.output
    # without --retain, the photos of the index give the retention pairs
    r = cli("index", tmp_path / "g", "--model", base)
    assert r.exit_code == 0, r.output
    r = cli(*args, "--out", tmp_path / "m5", "--json")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    wise = report["wise"]
    assert "of index 'default'" in wise["retention_pairs"] and "note" not in wise
    assert wise["retention"]["base"]["images"] >= 2
    # what the built set cost and what of it was replayed (half its photos, by the default)
    built = report["retention"]
    assert built["source"] == wise["retention_pairs"] and built["seconds"] > 0
    assert built["files"] == built["measured"]["files"] + built["replayed"]["files"]
    assert built["replayed"]["files"] >= 2 and built["replayed"]["samples"] > 0
    assert wise["retention"]["base"]["images"] == built["measured"]["files"]


def test_index_retention_pairs_each_query_with_its_best_photo_once():
    from mmsearch.finetune.retention import base_model_pairs

    img = np.eye(4, dtype=np.float32)
    txt = np.array([[0.9, 0.1, 0, 0], [0.8, 0.6, 0, 0], [0, 0, 0.2, 0.98], [0, 0, 0.1, 0.99]])
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
    # query 1's best photo (0) is taken by the more confident query 0; query 2's by query 3
    assert sorted(base_model_pairs(img, txt)) == [(0, 0), (3, 3)]
