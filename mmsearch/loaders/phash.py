"""A perceptual hash of a photo: 64 bits that stay (nearly) the same when the photo is resized or
recompressed, and differ when the picture does.

The DCT hash of Zauner ("Implementation and Benchmarking of Perceptual Image Hash Functions",
2010), as the imagehash package's `phash` computes it: the photo squashed to 32x32 grey levels,
its 2-D DCT, and one bit per coefficient of the lowest 8x8 frequencies: above their median or not. Recording it costs ~0.1 ms on a photo already decoded for the image tower.

Why it is recorded beside the vectors: a weak image model may score a heavy re-encode of a photo
below two distinct shots of one scene, where the hashes still tell them apart (measured in
benchmarks/bench_duplicates.py). A leaf module: loaders import it in worker processes.
"""

from __future__ import annotations

import numpy as np

BITS = 64
_SIDE = 32  # the photo is reduced to _SIDE x _SIDE grey levels
_LOW = 8  # the lowest _LOW x _LOW frequencies give the bits


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_SIDE)


def phash(image) -> int:
    """The 64-bit perceptual hash of a PIL image (any mode), as a signed int (SQLite's INTEGER).

    The whole picture is hashed, squashed to a square: a resized copy keeps its hash, a cropped
    one does not. Apply EXIF orientation first, so a rotated-by-tag copy matches its pixels."""
    from PIL import Image

    grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    return phash_of_array(np.asarray(grey, np.float64))


def phash_of_array(grey: np.ndarray) -> int:
    """The hash of a _SIDE x _SIDE array of grey levels."""
    freq = _DCT @ grey @ _DCT.T
    low = freq[:_LOW, :_LOW].ravel()
    bits = low > np.median(low)
    value = int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])
    return value - (1 << BITS) if value >= 1 << (BITS - 1) else value


def hamming(a, b) -> np.ndarray:
    """Bits in which hashes `a` and `b` differ (arrays or ints, signed 64-bit, broadcast)."""
    x = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64))
    return np.bitwise_count(x.view(np.uint64) if x.ndim else x.astype(np.uint64)).astype(np.int64)
