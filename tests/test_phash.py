"""The perceptual hash that photos get at index time: the same for a resized or recompressed copy,
far apart for a different picture, and computed on the picture as shown (EXIF orientation)."""

from __future__ import annotations

import io

import numpy as np
from conftest import smooth_picture
from PIL import Image, ImageOps

from mmsearch.loaders.phash import BITS, hamming, phash


def reencoded(img: Image.Image, scale: float = 1.0, quality: int = 35) -> Image.Image:
    if scale != 1.0:
        img = img.resize((int(img.width * scale), int(img.height * scale)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_resized_and_recompressed_copies_keep_their_hash():
    for seed in range(10):
        img = smooth_picture(seed)
        h = phash(img)
        assert hamming(h, phash(reencoded(img))) <= 4
        assert hamming(h, phash(reencoded(img, scale=0.5))) <= 4
        assert hamming(h, phash(reencoded(img, scale=2.0, quality=90))) <= 4


def test_different_pictures_are_far_apart():
    hashes = np.array([phash(smooth_picture(seed)) for seed in range(30)])
    d = hamming(hashes[:, None], hashes[None, :])
    off_diagonal = d[~np.eye(len(hashes), dtype=bool)]
    assert off_diagonal.min() > 12 and abs(np.median(off_diagonal) - BITS / 2) < 8


def test_hash_is_of_the_picture_as_shown():
    img = smooth_picture(3)
    turned = img.transpose(Image.Transpose.ROTATE_90)
    assert hamming(phash(img), phash(turned)) > 12  # another picture, as far as pixels go
    tagged = turned.copy()
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show": undoes ROTATE_90 (anticlockwise)
    buf = io.BytesIO()
    tagged.save(buf, "JPEG", quality=95, exif=exif)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))
    assert hamming(phash(img), phash(shown)) <= 4


def test_hamming_counts_differing_bits_of_signed_hashes():
    assert hamming(0, -1) == 64 and hamming(-1, -1) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert list(hamming(np.array([0, 1, -(2**63)]), 0)) == [0, 1, 1]
    h = phash(smooth_picture(1))
    assert -(2**63) <= h < 2**63 and isinstance(h, int)
