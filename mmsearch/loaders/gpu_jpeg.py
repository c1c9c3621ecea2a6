"""JPEG files decoded in batches on the image tower's GPU (nvjpeg), oriented, resized and cropped
there, one batch ahead of the encoder.

Chosen by the indexing run only when the image tower runs on CUDA (`LoadSettings.jpeg_bytes`):
decode workers then hash each file, read its header (date taken, size, EXIF orientation) and pass
on the bytes of the JPEGs nvjpeg takes (`image.device_decodable`: baseline RGB or grey), decoding
the others (progressive, CMYK, PNG, ...) themselves as before. Decided per file, never per batch:
when nvjpeg refuses a batch, its files are decoded one by one, and a file it refuses alone is
decoded on the CPU as `load_image` does; one that fails there too fails alone, with its reason.

The same code runs on the CPU (torchvision's libjpeg decoder), which is how it is tested. The
pictures match the CPU path's within a few grey levels: the CPU path decodes JPEGs at a reduced
DCT scale (draft) before its bicubic pass, this one resizes the full picture (antialiased).
torchvision deprecates its image decoders (0.29) in favour of TorchCodec; they still work.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from ..config import ImagePrep
from ..errors import LoadError
from .image import JpegBytes, center_crop_or_pad, decode_photo, open_image, resized_size
from .phash import _SIDE, phash_of_array

_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "lanczos": "bicubic"}
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


def decode_batch(items: Sequence[JpegBytes], prep: ImagePrep, device: str) -> list:
    """Per item: (uint8 (H, W, 3) picture on `device`, perceptual hash), or the reason it
    could not be decoded."""
    import torch

    raw = [torch.frombuffer(bytearray(x.data), dtype=torch.uint8) for x in items]
    out, greys = [], {}
    for i, (x, img) in enumerate(zip(items, _decode(raw, device), strict=True)):
        if img is None:  # refused on the device: decoded on the CPU, as load_image would
            out.append(_on_cpu(x, prep, device))
            continue
        img = orient(img, x.orientation)
        out.append(prepare(img, prep))
        greys[i] = _small_grey(img)
    if greys:  # one copy back for the batch's perceptual hashes
        small = torch.stack(list(greys.values())).double().cpu().numpy()
        for i, grey in zip(greys, small, strict=True):
            out[i] = (out[i], phash_of_array(grey))
    return out


def _decode(raw: list, device: str) -> list:
    """Each (3, H, W) picture decoded on `device`, or None where the decoder refused it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see the module's docstring
        try:
            return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # one file spoils the batch: each alone
        out = []
        for r in raw:
            try:
                out.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def _on_cpu(x: JpegBytes, prep: ImagePrep, device: str):
    import torch

    try:
        with open_image(io.BytesIO(x.data)) as img:
            picture, meta = decode_photo(img, prep)
    except LoadError as e:
        return e.reason
    return torch.from_numpy(picture).to(device), meta.phash


def orient(img, orientation: int):
    """A (C, H, W) picture as shown: its EXIF orientation applied (as PIL's exif_transpose)."""
    if orientation in (5, 7):  # transposed, then as 1 (5) or turned half (7)
        img = img.transpose(1, 2)
        return img if orientation == 5 else img.flip(1, 2)
    if orientation in (6, 8):  # turned a quarter: 6 clockwise, 8 counter-clockwise
        return img.rot90(1 if orientation == 8 else -1, dims=(1, 2))
    flips = {2: (2,), 3: (1, 2), 4: (1,)}.get(orientation)
    return img.flip(flips) if flips else img


def prepare(img, prep: ImagePrep):
    """A (3, H, W) uint8 picture resized and cropped (or padded) like `image.resize_crop`, on
    its device: (H, W, 3) uint8."""
    import torch

    h, w = img.shape[1:]
    nw, nh = resized_size(w, h, prep)
    if (nw, nh) != (w, h):
        mode = _MODES.get(prep.interpolation, "bicubic")
        x = torch.nn.functional.interpolate(
            img[None].float(), size=(nh, nw), mode=mode, antialias=mode != "nearest"
        )
        img = x[0].round_().clamp_(0, 255).to(torch.uint8)
    hwc = img.permute(1, 2, 0)
    return center_crop_or_pad(
        hwc, *prep.size, prep.fill_color, full=lambda shape: hwc.new_full(shape, prep.fill_color)
    ).contiguous()


def _small_grey(img):
    """An oriented (3, H, W) picture squashed to the perceptual hash's 32x32 grey levels on its
    device (antialiased bicubic, where the CPU path uses Lanczos: the hashes agree within a few
    bits)."""
    import torch

    grey = sum(c * img[i].float() for i, c in enumerate(_GREY))[None, None]
    small = torch.nn.functional.interpolate(grey, (_SIDE, _SIDE), mode="bicubic", antialias=True)
    return small[0, 0].round().clamp(0, 255)


def pictures(batches: list[list], prep: ImagePrep, device: str) -> Iterator[list]:
    """Per batch of Loaded images: each one's picture (a uint8 (H, W, 3) array or tensor) or the
    reason it failed; JpegBytes payloads decoded on `device` one batch ahead, on a thread, while
    the caller encodes the batch before (torch releases the GIL in its kernels). A decoded JPEG's
    perceptual hash goes into its Loaded's meta."""
    if not batches:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="jpeg") as pool:
        ahead = pool.submit(_batch_pictures, batches[0], prep, device)
        for i in range(len(batches)):
            done = ahead.result()
            if i + 1 < len(batches):
                ahead = pool.submit(_batch_pictures, batches[i + 1], prep, device)
            yield done


def _batch_pictures(batch: list, prep: ImagePrep, device: str) -> list:
    where = [i for i, x in enumerate(batch) if isinstance(x.payload, JpegBytes)]
    out = [x.payload for x in batch]
    if where:
        for i, got in zip(where, decode_batch([out[i] for i in where], prep, device), strict=True):
            if isinstance(got, str):
                out[i] = got
            else:
                out[i], phash = got
                if batch[i].meta is not None:
                    batch[i].meta = replace(batch[i].meta, phash=phash)
    return out


def as_arrays(pictures: list) -> list[np.ndarray]:
    """Pictures as numpy arrays (tests and benchmarks compare them with the CPU path's)."""
    return [p if isinstance(p, np.ndarray) else p.cpu().numpy() for p in pictures]
