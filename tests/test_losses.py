"""The one InfoNCE gives bit for bit what the three copies it replaced gave (fp32, CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from mmsearch.losses import clip_loss, info_nce  # noqa: E402


@pytest.fixture(autouse=True)
def _pinned_threads():
    # Reductions may be split differently with another thread count; pin it for both sides.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random(seed: int, n: int = 12, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _old_finetune_loss(image_features, text_features, scale, groups=None):
    # mmsearch/finetune/loss.py: clip_loss
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = scale * image @ text.T
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _old_audio_info_nce(audio, text, scale, file_ids, text_ids):
    # mmsearch/finetune/audio.py: _info_nce
    logits = scale * F.normalize(audio, dim=-1) @ F.normalize(text, dim=-1).T
    same = (file_ids[:, None] == file_ids[None, :]) | (text_ids[:, None] == text_ids[None, :])
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _old_refine_loss(z, y, temperature):
    # mmsearch/encoders/clap/projector.py: _refine's loss
    labels = torch.arange(len(z))
    logits = z @ y.T / temperature
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_finetune_loss(seed):
    img, txt = _random(seed)
    scale = torch.tensor(14.3)
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 7])
    for g in (None, groups):
        assert torch.equal(clip_loss(img, txt, scale, g), _old_finetune_loss(img, txt, scale, g))
    assert torch.equal(clip_loss(img, txt, 1 / 0.07), _old_finetune_loss(img, txt, 1 / 0.07))


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_audio_finetune_loss(seed):
    audio, text = _random(seed)
    scale = torch.tensor(20.0)
    file_ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])
    text_ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 2, 9])
    new = clip_loss(audio, text, scale, groups=(file_ids, text_ids))
    assert torch.equal(new, _old_audio_info_nce(audio, text, scale, file_ids, text_ids))


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_projector_refinement_loss(seed):
    x, y = _random(seed)
    z, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    assert torch.equal(info_nce(z, y, temperature=0.05), _old_refine_loss(z, y, 0.05))


def test_gradients_match_too():
    img, txt = _random(7)
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 7])
    grads = []
    for fn in (clip_loss, _old_finetune_loss):
        a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        s = torch.tensor(2.5).requires_grad_(True)
        fn(a, b, s.exp(), groups).backward()
        grads.append((a.grad, b.grad, s.grad))
    for new, old in zip(*grads, strict=True):
        assert torch.equal(new, old)


def test_masking_shared_rows_only_removes_negatives():
    img, txt = _random(3, n=6)
    txt[1] = txt[0]  # two captions that are one: without the mask each is the other's negative
    z, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    plain = info_nce(z, t, scale=10.0)
    masked = info_nce(z, t, scale=10.0, groups=torch.tensor([0, 0, 1, 2, 3, 4]))
    assert torch.isfinite(masked) and masked < plain
    assert torch.equal(info_nce(z, t, scale=10.0, groups=torch.arange(6)), plain)
    # two id vectors combine: a row shared in either is not a negative
    both = info_nce(z, t, scale=10.0, groups=(torch.tensor([0, 0, 1, 2, 3, 4]), torch.arange(6)))
    assert torch.equal(both, masked)


def test_exactly_one_of_scale_and_temperature():
    z, t = _random(0, n=3)
    with pytest.raises(ValueError):
        info_nce(z, t)
    with pytest.raises(ValueError):
        info_nce(z, t, scale=1.0, temperature=1.0)
