"""Image decoding: what the model sees for odd images, and agreement with open_clip's transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmsearch.config import ImagePrep
from mmsearch.errors import LoadError
from mmsearch.loaders import image as image_loader
from mmsearch.loaders.image import load_image

PREP = ImagePrep(size=(32, 32))


def _save(img: Image.Image, tmp_path, name: str, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


def test_alpha_is_composited_onto_white(tmp_path):
    p = _save(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), tmp_path, "clear.png")
    assert (load_image(p, PREP) == 255).all()


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    p = _save(img, tmp_path, "pal.png", transparency=0)
    assert (load_image(p, PREP) == 255).all()


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = np.full((20, 20), 32896, dtype=np.uint16)  # half of 65535
    p = _save(Image.fromarray(a), tmp_path, "deep.png")
    out = load_image(p, PREP)
    assert out.shape == (32, 32, 3)
    assert abs(int(out.mean()) - 128) <= 1


def test_cmyk_becomes_rgb(tmp_path):
    p = _save(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), tmp_path, "cmyk.jpg")
    out = load_image(p, PREP)
    assert out.shape == (32, 32, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60  # red


def test_exif_orientation_is_applied(tmp_path):
    # a wide image tagged "rotate 90": the model must see it tall (left half red -> top half)
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = _save(img, tmp_path, "rot.jpg", exif=exif)
    prep = ImagePrep(size=(32, 32), resize_mode="squash")
    out = load_image(p, prep)
    # after a 90 degree clockwise rotation the red (left) half ends up on top
    assert out[:12, :, 0].mean() > 200 and out[-12:, :, 2].mean() > 200


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 255, 0)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    out = load_image(p, PREP)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def _pattern(mode: str, size=(30, 20)) -> Image.Image:
    """A `size` (w, h) image of seeded random pixels: a shift, flip, transposed crop, a channel
    mix-up or another resampling filter each change most of its resized pixels."""
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8), mode)


def _pil_reference(p) -> np.ndarray:
    """What PREP should give for a 30x20 file, computed by PIL alone: RGB, shortest side to 32
    (30x20 -> 48x32, bicubic), centre crop of 32 columns starting at (48 - 32) / 2 = 8."""
    with Image.open(p) as img:
        rgb = img.convert("RGB")
    out = rgb.resize((48, 32), Image.Resampling.BICUBIC).crop((8, 0, 40, 32))
    return np.asarray(out, dtype=np.int16)


@pytest.mark.parametrize("ext", ["bmp", "tiff", "webp", "png", "jpeg"])
def test_formats(tmp_path, ext):
    lossy = ext in ("jpeg", "webp")  # PIL writes WebP lossy by default
    p = _save(_pattern("RGB"), tmp_path, f"x.{ext}")
    out = load_image(p, PREP)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.int16) - _pil_reference(p)).max() <= 1
    if not lossy:  # lossless: the same as resizing the source pixels, never written to disk
        src = np.asarray(
            _pattern("RGB").resize((48, 32), Image.Resampling.BICUBIC).crop((8, 0, 40, 32))
        )
        assert np.abs(out.astype(np.int16) - src).max() <= 1
    # a solid colour comes back as exactly that colour (lossy formats within their quantisation)
    p = _save(Image.new("RGB", (30, 20), (0, 200, 0)), tmp_path, f"solid.{ext}")
    tol = 3 if lossy else 0
    assert np.abs(load_image(p, PREP).astype(np.int16) - (0, 200, 0)).max() <= tol


def test_grayscale(tmp_path):
    p = _save(_pattern("L"), tmp_path, "g.png")
    out = load_image(p, PREP)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # grey stays grey: the three channels are the one grey channel
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out.astype(np.int16) - _pil_reference(p)).max() <= 1
    p = _save(Image.new("L", (30, 20), 100), tmp_path, "solid.png")
    assert (load_image(p, PREP) == 100).all()


def test_truncated_and_garbage_give_reasons(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (9, 9, 9)).save(buf, "JPEG")
    trunc = tmp_path / "t.jpg"
    trunc.write_bytes(buf.getvalue()[:300])
    garbage = tmp_path / "g.jpg"
    garbage.write_bytes(b"hello")
    empty = tmp_path / "e.png"
    empty.write_bytes(b"")
    for p in (trunc, garbage, empty):
        with pytest.raises(LoadError) as e:
            load_image(p, PREP)
        assert e.value.reason


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(image_loader, "MAX_PIXELS", 1000)
    p = _save(Image.new("RGB", (100, 100)), tmp_path, "big.png")
    with pytest.raises(LoadError, match="too large"):
        load_image(p, PREP)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_matches_open_clip_transform(tmp_path, mode):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    rng = np.random.default_rng(0)
    prep = ImagePrep(size=(32, 32), resize_mode=mode)
    ref_t = image_transform_v2(PreprocessCfg(size=32, resize_mode=mode), is_train=False)
    mean, std = np.array(prep.mean) * 255, np.array(prep.std) * 255
    for i, size in enumerate([(50, 37), (37, 50), (32, 32), (200, 90), (20, 31)]):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        p = _save(Image.fromarray(arr), tmp_path, f"r{i}.png")
        ref = ref_t(Image.open(p)).numpy()
        ours = ((load_image(p, prep).astype(np.float32) - mean) / std).transpose(2, 0, 1)
        assert np.abs(ref - ours).max() < 1e-4, (mode, size)


def test_query_image_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    import os
    import threading

    fifo = tmp_path / "query.jpg"
    os.mkfifo(fifo)
    # should open() block, a writer releases it after 10 s and the test fails
    timer = threading.Timer(10, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    timer.start()
    try:
        with pytest.raises(LoadError) as e:
            load_image(fifo, PREP)
    finally:
        timer.cancel()
    assert e.value.reason == "not a regular file (fifo)"


def test_decodes_from_an_open_file_like_from_its_path(tmp_path):
    p = _save(Image.new("RGB", (50, 30), (10, 200, 30)), tmp_path, "a.jpg")
    with open(p, "rb") as f:
        with image_loader.open_image(f) as img:
            assert img.size == (50, 30)  # the header only, so far
            from_file = image_loader.decode_image(img, PREP)
    assert (from_file == load_image(p, PREP)).all()
