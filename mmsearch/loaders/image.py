"""Decode an image file into the model's input: uint8 (H, W, 3), resized and cropped like open_clip.

Runs in worker processes, so it imports only PIL and numpy.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from ..config import ImagePrep
from ..errors import LoadError
from ..records import FileMeta
from .phash import phash

# Refuse images whose header claims more pixels than this before decoding any of them.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 178_956_970

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def load_image(path, prep: ImagePrep) -> np.ndarray:
    """Open, orient, convert to RGB and resize `path` (a path or a binary file object); raises
    LoadError with a reason. A path that is not a regular file (a FIFO, a device) is refused
    without blocking."""
    if isinstance(path, (str, bytes, os.PathLike)):
        from .files import open_for_decoding

        with open_for_decoding(path) as f:
            return load_image(f, prep)
    with open_image(path) as img:
        return decode_image(img, prep)


@contextmanager
def _reasons() -> Iterator[None]:
    """PIL's many exceptions -> LoadError with a reason a user can act on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except LoadError:
        raise
    except Image.DecompressionBombError as e:
        raise LoadError(f"image too large: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise LoadError(f"image too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise LoadError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise LoadError(f"cannot decode image: {e}") from None


@contextmanager
def open_image(fp: BinaryIO) -> Iterator[Image.Image]:
    """The image in the open file `fp`, with only its header read: refused (LoadError) when it
    is not an image, or claims too many pixels, before any pixel data is read. Leaving the
    block closes the image, and with it `fp` (PIL closes the file it read from)."""
    with _reasons():
        img = _open(fp)
    try:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise LoadError(f"image too large: {w}x{h} pixels (limit {MAX_PIXELS})")
        if w == 0 or h == 0:
            raise LoadError("image has zero width or height")
        yield img
    finally:
        img.close()


def _open(fp: BinaryIO) -> Image.Image:
    """Image.open, and HEIF (the photos of iPhones) through pillow-heif, taught to Pillow the
    first time a file needs it: importing it costs more than decoding most photos."""
    try:
        return Image.open(fp)
    except Image.UnidentifiedImageError:
        if "HEIF" in Image.OPEN:
            raise
        from pillow_heif import register_heif_opener

        register_heif_opener()
        fp.seek(0)
        return Image.open(fp)


def decode_image(img: Image.Image, prep: ImagePrep) -> np.ndarray:
    """Decode an image from `open_image`: first frame, EXIF orientation, RGB, resized and
    cropped for the model as uint8 (H, W, 3)."""
    return resize_crop(_oriented_rgb(img, prep), prep)


def decode_photo(img: Image.Image, prep: ImagePrep) -> tuple[np.ndarray, FileMeta]:
    """`decode_image`, and what is recorded about the photo besides its vector: when it was
    taken (EXIF DateTimeOriginal), its size in pixels as shown (orientation applied) and the
    perceptual hash of the oriented picture."""
    meta, _ = photo_header(img)
    rgb = _oriented_rgb(img, prep)
    return resize_crop(rgb, prep), replace(meta, phash=phash(rgb))


def photo_header(img: Image.Image) -> tuple[FileMeta, int]:
    """What a photo's header says (read before any pixel): when it was taken, its size as shown
    (no phash: that needs the pixels), and its EXIF orientation (1: as stored)."""
    width, height = img.size  # before draft mode shrinks it
    exif = _exif(img)
    orientation = exif.get(_ORIENTATION)
    orientation = orientation if orientation in range(1, 9) else 1
    if orientation in (5, 6, 7, 8):  # turned a quarter: shown the other way round
        width, height = height, width
    return FileMeta(taken=taken_time(exif), width=width, height=height), orientation


class JpegBytes(NamedTuple):
    """A JPEG file's bytes, left for the encoder's GPU to decode (loaders/gpu_jpeg.py)."""

    data: bytes
    orientation: int = 1  # EXIF orientation


def device_decodable(img: Image.Image) -> bool:
    """Whether nvjpeg can decode this JPEG in a batch (from its header): baseline, RGB or grey.
    Progressive and CMYK files, and multi-picture ones (MPO), are decoded here instead."""
    progressive = img.info.get("progressive") or img.info.get("progression")
    return img.format == "JPEG" and img.mode in ("RGB", "L") and not progressive


def ends_whole(data: bytes) -> bool:
    """Whether JPEG bytes end with the end-of-image marker: a file cut short is decoded here,
    where it fails with its reason, rather than handed to a GPU decoder that may not say so."""
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


_ORIENTATION, _EXIF_IFD, _DATE_TAKEN, _OFFSET_TAKEN = 0x0112, 0x8769, 0x9003, 0x9011


def _exif(img: Image.Image):
    try:
        return img.getexif()
    except Exception:  # noqa: BLE001 - damaged EXIF: the photo itself may be fine
        return {}


def taken_time(exif) -> float | None:
    """When the photo was taken, from EXIF DateTimeOriginal ("2023:07:14 18:22:05"), as POSIX
    seconds: in the time zone of OffsetTimeOriginal where the camera wrote one, else in this
    machine's local time zone (as dates given to `search --after` are). None when absent or
    not a real date (cameras write "0000:00:00 00:00:00")."""
    from datetime import datetime

    try:
        sub = exif.get_ifd(_EXIF_IFD)
        text = str(sub.get(_DATE_TAKEN) or "").strip().rstrip("\x00")
        if not text:
            return None
        when = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
        offset = str(sub.get(_OFFSET_TAKEN) or "").strip().rstrip("\x00")
        if offset:
            when = datetime.strptime(f"{text[:19]} {offset}", "%Y:%m:%d %H:%M:%S %z")
        return when.timestamp()
    except (AttributeError, ValueError, TypeError, OverflowError, OSError, KeyError):
        return None


def _oriented_rgb(img: Image.Image, prep: ImagePrep) -> Image.Image:
    """First frame, EXIF orientation applied, RGB (JPEGs decoded at reduced scale, see below)."""
    with _reasons():
        if prep.draft and img.format == "JPEG":
            # DCT-domain downscaling; keep >= 2x the target so the bicubic pass that
            # follows stays within the fidelity bound of the reference preprocessing.
            img.draft("RGB", (2 * prep.size[1], 2 * prep.size[0]))
        img.seek(0)  # first frame of animations
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with alpha composited onto white, 16/32-bit scaled (not clipped) to 8-bit, CMYK converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "I":
            a = a / 257.0 if a.max(initial=0) > 255 else a
        else:  # float images: assume 0..1 when they fit, else scale by the maximum
            top = a.max(initial=0)
            a = a * 255.0 if top <= 1.0 else a * (255.0 / top)
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("L", "RGB") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    return img.convert("RGB")


def resize_crop(img: Image.Image, prep: ImagePrep) -> np.ndarray:
    """open_clip's eval transform (resize_mode shortest/longest/squash, then centre crop or pad)."""
    resample = _RESAMPLE.get(prep.interpolation, Image.Resampling.BICUBIC)
    size = resized_size(*img.size, prep)
    if size != img.size:
        img = img.resize(size, resample)
    a = center_crop_or_pad(np.asarray(img, dtype=np.uint8), *prep.size, prep.fill_color)
    return np.ascontiguousarray(a)


def resized_size(w: int, h: int, prep: ImagePrep) -> tuple[int, int]:
    """The (width, height) open_clip resizes a w x h picture to before cropping or padding."""
    th, tw = prep.size
    if prep.resize_mode == "squash":
        return tw, th
    if prep.resize_mode == "longest":
        ratio = max(h / th, w / tw)
        nh, nw = round(h / ratio), round(w / ratio)
    elif th == tw:
        # torchvision Resize(int): shortest side to size, long side truncated like torchvision
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(th * long / short)
        nw, nh = (th, new_long) if w <= h else (new_long, th)
    else:
        ratio = min(h / th, w / tw)
        nh, nw = round(h / ratio), round(w / ratio)
    return max(nw, 1), max(nh, 1)


def center_crop_or_pad(a, th: int, tw: int, fill: int, full=None):
    """The centre th x tw of an (H, W, 3) array, padded with `fill` where it is smaller. Works
    on torch tensors too, given `full(shape)` making a filled one (loaders/gpu_jpeg.py)."""
    h, w = a.shape[:2]
    if h < th or w < tw:
        shape = (max(h, th), max(w, tw), 3)
        out = full(shape) if full else np.full(shape, fill, dtype=np.uint8)
        top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
        out[top : top + h, left : left + w] = a
        a, h, w = out, out.shape[0], out.shape[1]
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return a[top : top + th, left : left + tw]


def load_thumbnail(path, side: int) -> Image.Image:
    """`path` (a path or a binary file object) for display: first frame, EXIF orientation, RGB,
    scaled to fit in `side` x `side` (never up). JPEGs are decoded at a reduced size. Raises
    LoadError with a reason, as load_image does."""
    if isinstance(path, (str, bytes, os.PathLike)):
        from .files import open_for_decoding

        with open_for_decoding(path) as f:
            return load_thumbnail(f, side)
    with open_image(path) as img, _reasons():
        if img.format == "JPEG":
            img.draft("RGB", (side, side))  # decoded at the smallest scale still >= side
        img.seek(0)
        img.load()
        rgb = to_rgb(ImageOps.exif_transpose(img) or img)
        rgb.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        return rgb
