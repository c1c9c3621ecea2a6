"""Our pipeline must agree with open_clip's reference (create_model_and_transforms + encode_*)
to cosine >= 0.99 for the same image and text, so each model's published quality carries over."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_note
from PIL import Image

from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, index_root
from mmsearch.pipeline.run import index_paths
from mmsearch.storage.collection import Collection


def reference(model_dir, images, texts):
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    with torch.no_grad():
        iv = model.encode_image(
            torch.stack([preprocess(Image.open(p)) for p in images]), normalize=True
        )
        tv = model.encode_text(tok(texts), normalize=True)
    return iv.numpy(), tv.numpy()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_indexed_vectors_match_open_clip(tiny_model, tmp_path, precision):
    rng = np.random.default_rng(0)
    d = tmp_path / "fid"
    d.mkdir()
    images = []
    # photo-like content (smooth gradients + noise); sizes that do and do not trigger JPEG draft
    for i, (w, h) in enumerate([(32, 32), (90, 60), (200, 150), (640, 480)]):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        p = d / f"img{i}.jpg"
        Image.fromarray(arr).save(p, quality=92)
        images.append(p)
    text = "a small boat on a calm lake at dawn"
    make_note(d / "note.txt", text)
    index_paths(
        IndexOptions(
            roots=(d,),
            root_dir=index_root(),
            encoder=EncoderOptions(
                model=ModelSpec.parse(str(tiny_model)), device="cpu", precision=precision
            ),
            workers=0,
        )
    )
    ref_img, ref_txt = reference(tiny_model, images, [text])
    with Collection.open_reader(index_root(), "default") as col:
        rows = col.catalog.files_under([os.fsencode(d)])
        for p, ref in zip(images, ref_img, strict=True):
            ((_, vec),) = col.catalog.units_of(rows[os.fsencode(p)].id)
            assert float(vec @ ref) >= 0.99, (p.name, precision)
        ((_, note_vec),) = col.catalog.units_of(rows[os.fsencode(d / "note.txt")].id)
        assert float(note_vec @ ref_txt[0]) >= 0.99


def test_torch_free_query_tower_matches_open_clip(tiny_model, tmp_path):
    """The tower cold searches use is exported at index time, also from a bf16 index."""
    from mmsearch.encoders import query_text_tower
    from mmsearch.storage.collection import Collection
    from mmsearch.storage.layout import model_cache_dir

    d = tmp_path / "q"
    make_note(d / "n.txt", "hello world")
    index_paths(
        IndexOptions(
            roots=(d,),
            root_dir=index_root(),
            encoder=EncoderOptions(
                model=ModelSpec.parse(str(tiny_model)), device="cpu", precision="bf16"
            ),
            workers=0,
        )
    )
    with Collection.open_reader(index_root(), "default") as col:
        key = col.encoder_identity.key
    tower = query_text_tower(model_cache_dir(index_root(), key))
    assert tower is not None
    texts = ["a dog on a beach", "!~", "<start_of_text> odd", "ünïcödé & emoji 🐶"]
    ref = _ref_text(tiny_model, texts)
    ours = tower.embed(texts)
    assert (ours * ref).sum(1).min() >= 0.999


def _ref_text(model_dir, texts):
    import open_clip
    import torch

    model = open_clip.create_model(f"local-dir:{model_dir}").eval()
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    with torch.no_grad():
        return model.encode_text(tok(texts), normalize=True).numpy()
