"""JPEG decoding for an image tower on a GPU (loaders.gpu_jpeg), run here on the CPU through
torchvision's CPU decoder: the pictures the model sees match the CPU path's, a file the device
decoder refuses falls back alone, and a broken one fails alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_photo, smooth_picture
from PIL import Image

from mmsearch.config import ImagePrep
from mmsearch.loaders import LoadSettings, load_file
from mmsearch.loaders import gpu_jpeg as gj
from mmsearch.loaders.image import JpegBytes, decode_photo, load_image, open_image
from mmsearch.loaders.phash import hamming
from mmsearch.records import FileEntry

PREP = ImagePrep(size=(64, 64))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def cpu_path(data: bytes, prep: ImagePrep = PREP):
    with open_image(io.BytesIO(data)) as img:
        return decode_photo(img, prep)


def assert_close(got, want):
    got = got if isinstance(got, np.ndarray) else got.cpu().numpy()
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), diff.max())


@pytest.mark.parametrize(
    "size,prep",
    [
        ((160, 120), PREP),
        ((120, 200), PREP),
        ((300, 90), ImagePrep(size=(48, 64))),
        ((100, 80), ImagePrep(size=(64, 64), resize_mode="longest", fill_color=7)),
        ((90, 150), ImagePrep(size=(32, 40), resize_mode="squash", interpolation="bilinear")),
    ],
)
def test_a_batch_decodes_as_the_cpu_path_does(size, prep):
    photos = [jpeg(smooth_picture(seed, size)) for seed in range(3)]
    photos.append(jpeg(smooth_picture(9, size).convert("L")))  # grey
    got = gj.decode_batch([JpegBytes(p) for p in photos], prep, "cpu")
    for (picture, phash), data in zip(got, photos, strict=True):
        want, meta = cpu_path(data, prep)
        assert_close(picture, want)
        assert hamming(phash, meta.phash) <= 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_does(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(smooth_picture(orientation, (96, 64)), exif=exif)
    want, _ = cpu_path(data)
    ((picture, _),) = gj.decode_batch([JpegBytes(data, orientation)], PREP, "cpu")
    assert_close(picture, want)


def _nvjpeg_like(monkeypatch, refused: set[bytes]):
    """torchvision's decoder made to refuse some files as nvjpeg does (progressive, CMYK),
    refusing the whole batch that holds one of them."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    calls = []

    def decode(data, **kw):
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if any(bytes(t.numpy()) in refused for t in batch):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    return calls


def test_a_refused_or_broken_file_falls_back_or_fails_alone(monkeypatch):
    pictures = [smooth_picture(seed) for seed in range(4)]
    good = jpeg(pictures[0])
    progressive = jpeg(pictures[1], progressive=True)
    cmyk = jpeg(pictures[2].convert("CMYK"))
    truncated = jpeg(pictures[3])[:1500]
    garbage = good[:200] + bytes(range(256)) * 8
    calls = _nvjpeg_like(monkeypatch, {progressive, cmyk})
    files = [good, progressive, truncated, cmyk, garbage, good]
    got = gj.decode_batch([JpegBytes(f) for f in files], PREP, "cpu")
    assert calls[0] == len(files) and calls[1:] == [1] * len(files)  # the batch, then one by one
    for i in (0, 1, 3, 5):  # decoded: on the "device", or on the CPU where it was refused
        assert_close(got[i][0], cpu_path(files[i])[0])
    assert "truncated" in got[2] and "cannot" in got[4]  # the CPU path's reasons


def test_workers_pass_on_only_what_the_device_decodes(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = {
        "baseline": make_photo(tmp_path / "a.jpg", 1, size=(160, 120), exif=exif),
        "progressive": tmp_path / "p.jpg",
        "cmyk": tmp_path / "c.jpg",
        "png": tmp_path / "i.png",
        "cut short": tmp_path / "t.jpg",
    }
    smooth_picture(2).save(paths["progressive"], "JPEG", progressive=True)
    smooth_picture(3).convert("CMYK").save(paths["cmyk"], "JPEG")
    smooth_picture(4).save(paths["png"])
    paths["cut short"].write_bytes(paths["baseline"].read_bytes()[:3000])
    settings = LoadSettings(image_prep=PREP, jpeg_bytes=True)
    loaded = {
        k: load_file(FileEntry(bytes(p), "image", p.stat().st_size, 0), settings)
        for k, p in paths.items()
    }
    base = loaded["baseline"]
    assert isinstance(base.payload, JpegBytes) and base.payload.orientation == 6
    assert (base.meta.width, base.meta.height, base.meta.phash) == (120, 160, None)  # as shown
    assert base.hash == load_file(base.entry, LoadSettings(image_prep=PREP)).hash
    for kind in ("progressive", "cmyk", "png"):
        assert isinstance(loaded[kind].payload, np.ndarray), kind
        assert loaded[kind].meta.phash is not None
    # cut short: decoded here (where it fails with its reason), not left to a GPU decoder
    assert "truncated" in loaded["cut short"].error


def test_embedding_decodes_on_the_device_and_fails_only_the_broken_file(tiny_model, tmp_path):
    """embed_images with JPEGs left as bytes: the same vectors as the CPU path's, the perceptual
    hash filled in, a broken file failed alone."""
    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.embed import Embedded, embed_loaded
    from mmsearch.encoders import create_encoder

    enc = create_encoder(
        ModelSpec.parse(str(tiny_model)), EncoderOptions(device="cpu", precision="fp32")
    )
    paths = [make_photo(tmp_path / f"{i}.jpg", i) for i in range(5)]
    entries = [FileEntry(bytes(p), "image", p.stat().st_size, 0) for p in paths]
    device = [load_file(e, LoadSettings(image_prep=enc.prep, jpeg_bytes=True)) for e in entries]
    assert all(isinstance(x.payload, JpegBytes) for x in device)
    # one whose bytes neither the device nor the CPU can decode
    device[2].payload = JpegBytes(device[2].payload.data[:1200])
    got = embed_loaded(enc, device, 2, lambda n: None)
    assert "truncated" in got[2]
    ok = [i for i in range(5) if i != 2]
    cpu = [load_file(entries[i], LoadSettings(image_prep=enc.prep)) for i in ok]
    want = embed_loaded(enc, cpu, 2, lambda n: None)
    for i, w, x in zip(ok, want, cpu, strict=True):
        assert isinstance(got[i], Embedded)
        assert float(got[i].vectors[0] @ w.vectors[0]) > 0.99
        assert hamming(device[i].meta.phash, x.meta.phash) <= 6


def test_load_image_is_what_the_cpu_path_decodes(tmp_path):
    """The reference the tests above compare with is the indexing path itself."""
    p = make_photo(tmp_path / "x.jpg", 5)
    np.testing.assert_array_equal(load_image(p, PREP), cpu_path(p.read_bytes())[0])


def test_an_index_run_decoding_jpegs_as_a_gpu_would(tiny_model, tmp_path, monkeypatch):
    """index_paths with the device-decode path on (as with an image tower on CUDA), here on the
    CPU: every photo is found by itself, the cut-short one fails alone with its reason, a PNG and
    a progressive JPEG decode in the workers, and each photo's size and perceptual hash are
    recorded as the CPU path records them."""
    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, SearchOptions, index_root
    from mmsearch.pipeline import run
    from mmsearch.search import Searcher

    monkeypatch.setattr(run, "decodes_on_gpu", lambda encoder, options: True)
    on_device = []
    real = gj.decode_batch
    monkeypatch.setattr(
        gj, "decode_batch", lambda items, *a: on_device.extend(items) or real(items, *a)
    )
    root = tmp_path / "photos"
    paths = [make_photo(root / f"p{i}.jpg", i, size=(200, 150)) for i in range(8)]
    smooth_picture(20).save(root / "prog.jpg", "JPEG", progressive=True)
    smooth_picture(21).save(root / "still.png")
    (root / "cut.jpg").write_bytes(paths[0].read_bytes()[:2500])
    encoder = EncoderOptions(model=ModelSpec.parse(str(tiny_model)), precision="fp32")
    options = IndexOptions(roots=(root,), root_dir=index_root(), encoder=encoder, workers=1)
    report = run.index_paths(options)
    assert (report.added, report.failed) == (10, 1)
    assert len(on_device) == 8  # the baseline JPEGs; the others were decoded by the worker
    with Searcher(SearchOptions()) as s:
        for p in paths[1:4]:
            assert s.search(image=p, k=1)[0].path == bytes(p)
        fails = s.col.catalog.failures()
        rows, _ = s.col.catalog.file_vectors(s.col.dim, "image")
    assert [(path, "truncated" in why) for path, why, _ in fails] == [
        (bytes(root / "cut.jpg"), True)
    ]
    meta = {r[0]: r[3:] for r in rows}  # path: (width, height, phash)
    for p in paths:
        with open_image(open(p, "rb")) as img:
            _, want = decode_photo(img, PREP)
        width, height, phash = meta[bytes(p)]
        assert (width, height) == (200, 150) and hamming(phash, want.phash) <= 4
