"""The text tower's split, read in one place for the numpy export and for fine-tuning: the cut
forward equals open_clip's own for every tower it accepts, and towers where cutting the batch
could change the result are refused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from mmsearch.encoders.text_parts import (  # noqa: E402
    clip_text_tower,
    encode_text,
    split_text_tower,
)

VISION = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TEXTS = ["a dog", "", "a red double-decker bus in London under a cloudy sky at dusk"]


def _clip():
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=VISION, text_cfg=TEXT).eval()


def _custom(**text):
    torch.manual_seed(1)
    cfg = {**TEXT, **text}
    return open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=VISION, text_cfg=cfg).eval()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_clip, id="clip"),
        pytest.param(lambda: _custom(ls_init_value=0.5, proj_bias=True), id="custom-text"),
    ],
)
def test_cut_forward_equals_open_clip_and_runs_only_the_used_columns(make):
    model = make()
    tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    parts = split_text_tower(model)
    assert parts is not None and parts.pad_id == 0
    src, why = clip_text_tower(model)
    assert why is None
    seen = []
    hook = src.transformer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            got = encode_text(model, tokens)
    finally:
        hook.remove()
    with torch.no_grad():
        ref = model.encode_text(tokens)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    longest = int((tokens != 0).sum(1).max())  # start, words, end of the longest text
    assert seen[0][1] == longest < tokens.shape[1]


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: _custom(pool_type="last"), "pooling"),
        (lambda: _custom(no_causal_mask=True), "causal"),
        (lambda: _custom(embed_cls=True), "class token"),
        (lambda: torch.nn.Linear(2, 2), "not an open_clip"),
    ],
)
def test_towers_that_padding_can_change_are_not_cut(make, why):
    model = make().eval()
    src, reason = clip_text_tower(model)
    assert src is None and why in reason
    assert split_text_tower(model) is None
    if hasattr(model, "encode_text"):
        tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
        with torch.no_grad():
            assert torch.equal(encode_text(model, tokens), model.encode_text(tokens))
