"""CLAP audio tower + projector into the CLIP space, on tiny random models saved to disk and loaded
back through the same path users take (ClapModel/ClapProcessor.from_pretrained, load_clip)."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmsearch.config import EncoderOptions, ModelSpec
from mmsearch.encoders import EncoderIdentity
from mmsearch.encoders.clap import (
    PROJECTOR_FILENAME,
    FitSettings,
    LogMel,
    Projector,
    fit_projector,
    fit_projector_from_embeddings,
    load_audio_tower,
    load_clap,
    load_projector,
    read_captions,
    retrieval_scores,
    save_projector,
)
from mmsearch.encoders.clap import projector as clap_projector
from mmsearch.errors import ModelError
from mmsearch.loaders.audio import load_audio

FAST = FitSettings(refine_steps=20)


# --- tiny models -------------------------------------------------------------------------------


def make_tiny_clip(out: Path) -> Path:
    import open_clip
    import torch

    from mmsearch.encoders.clip import save_model_dir

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 16,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    torch.manual_seed(0)
    return save_model_dir(
        open_clip.CLIP(**cfg), cfg, out, {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    )


def make_tiny_clap(out: Path, fusion: bool = False, seed: int = 0) -> Path:
    """A random ClapModel (16 kHz, 2 s windows, 16 mels) with a RoBERTa-style BPE tokenizer trained
    on the shipped captions, saved with save_pretrained so from_pretrained(out) loads it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        RobertaTokenizer,
    )

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_captions(), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = RobertaTokenizer(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=77,
    )
    fe = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=16000,
        hop_length=320,
        max_length_s=2,
        fft_window_size=512,
        frequency_min=50,
        frequency_max=7000,
        truncation="fusion" if fusion else "rand_trunc",
        padding="repeatpad",
    )
    ClapProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(out)
    audio = dict(
        num_mel_bins=16,
        spec_size=64,
        window_size=4,
        patch_size=4,
        patch_stride=(4, 4),
        patch_embeds_hidden_size=16,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        hidden_size=32,
    )
    if fusion:
        audio.update(enable_fusion=True, fusion_type="aff_2d")
    cfg = ClapConfig(
        text_config=dict(
            vocab_size=400,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=80,
        ),
        audio_config=audio,
        projection_dim=24,
    )
    torch.manual_seed(seed)
    ClapModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    from mmsearch.encoders.clip import load_clip

    root = tmp_path_factory.mktemp("audio-models")
    clip_dir = make_tiny_clip(root / "clip")
    clap_dir = make_tiny_clap(root / "clap")
    encoder = load_clip(
        ModelSpec.parse(str(clip_dir)), EncoderOptions(device="cpu", precision="fp32")
    )
    return {"root": root, "clip": clip_dir, "clap": clap_dir, "encoder": encoder}


@pytest.fixture(scope="session")
def captions():
    return read_captions()[::8]  # ~540 captions keep the fit quick


@pytest.fixture(scope="session")
def tower(models, captions, tmp_path_factory):
    cache = tmp_path_factory.mktemp("audio-cache")
    stages = []
    t = load_audio_tower(
        str(models["clap"]),
        models["encoder"],
        cache,
        captions=captions,
        settings=FAST,
        progress=lambda stage, done, total: stages.append(stage),
    )
    t.fit_stages = stages
    t.cache_dir = cache
    return t


def sound(seconds=1.2, rate=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))).astype(
        np.float32
    )


# --- features ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(frequency_min=50, truncation="rand_trunc"),  # laion/clap-htsat-unfused
        dict(truncation="fusion"),  # laion/clap-htsat-fused
        dict(
            feature_size=16,
            sampling_rate=16000,
            hop_length=320,
            max_length_s=2,
            fft_window_size=512,
            frequency_min=50,
            frequency_max=7000,
            truncation="rand_trunc",
        ),
    ],
)
def test_log_mel_matches_clap_feature_extractor(settings):
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor(**settings)
    n, rate = fe.nb_max_samples, fe.sampling_rate
    rng = np.random.default_rng(0)
    t = np.arange(n) / rate
    windows = [
        (0.1 * rng.standard_normal(n)).astype(np.float32),  # full length
        (0.5 * np.sin(2 * np.pi * 440 * t[: n // 3])).astype(np.float32),  # repeat-padded
        (1e-3 * rng.standard_normal(1000)).astype(np.float32),  # very short
        np.zeros(n // 7, np.float32),  # silence: the dB floor
    ]
    ref = fe(windows, sampling_rate=rate, return_tensors="np")["input_features"]
    ours = LogMel(fe)(windows).numpy()
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)
    for i in range(len(windows)):
        # float32 instead of float64: exact to rounding over the top 90 dB of each window; the
        # FFT's float32 floor only shows in bands 130+ dB below the peak (a pure synthetic tone).
        loud = ref[i] > ref[i].max() - 90
        assert err[i][loud].max() < 0.01
        assert err[i].max() < 3


def test_window_longer_than_model_input_is_cut_not_cropped_at_random(models):
    clap = load_clap(str(models["clap"]))
    mel = LogMel(clap.feature_extractor)
    x = sound(3.0)
    np.testing.assert_array_equal(mel.pad(x), x[: mel.max_samples])


# --- the tower ---------------------------------------------------------------------------------


def test_tower_shapes_norms_and_rates(tower, models):
    assert tower.sample_rate == 16000 and tower.window_s == 2.0 and tower.hop_s == 1.5
    assert asdict(tower.loader_settings()) == {"sample_rate": 16000, "window_s": 2.0, "hop_s": 1.5}
    assert tower.dim == models["encoder"].dim == 32
    v = tower.embed([sound(0.3), sound(2.0, seed=1), sound(5.0, seed=2), np.zeros(100, np.float32)])
    assert v.shape == (4, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert tower.embed_clap([sound()]).shape == (1, 24)


def test_same_file_gives_bit_identical_vectors(tower, models, captions, tmp_path):
    p = tmp_path / "clip.wav"
    sf.write(str(p), np.concatenate([sound(3.1, 44100), sound(1.0, 44100, seed=3)]), 44100)

    def vectors(t):
        a = load_audio(p, t.loader_settings())
        return t.embed([w for _, _, w in a.windows])

    first = vectors(tower)
    assert first.shape[0] >= 2
    assert vectors(tower).tobytes() == first.tobytes()
    again = load_audio_tower(
        str(models["clap"]), models["encoder"], tower.cache_dir, captions=captions, settings=FAST
    )
    assert vectors(again).tobytes() == first.tobytes()


def test_encoder_encode_audio_uses_the_tower(tower, models):
    from mmsearch.encoders.base import Encoder

    enc = models["encoder"]
    joined = Encoder(identity=enc.identity, dim=enc.dim, text=enc.text, audio=tower)
    v = joined.encode_audio([sound()])
    np.testing.assert_array_equal(v, tower.embed([sound()]))
    assert (joined.encode_text(["a dog barking"]) @ v.T).shape == (1, 1)


def test_identity_names_model_weights_projector_and_windows(tower, models):
    ident = tower.identity.to_dict()
    assert ident["spec"] == f"local-dir:{models['clap'].resolve()}"
    assert len(ident["weights"]) == 16 and ident["projector"] == tower.projector.hash
    assert ident["sample_rate"] == 16000 and ident["window_s"] == 2.0 and ident["hop_s"] == 1.5
    assert ident["features"]["truncation"] == "rand_trunc"
    assert ident["key"].startswith(f"{ident['weights']}-{ident['projector']}-")
    assert ident["dim"] == 32


def test_fusion_model_is_deterministic_too(models, captions, tmp_path):
    clap_dir = make_tiny_clap(tmp_path / "fused", fusion=True)
    t = load_audio_tower(
        str(clap_dir),
        models["encoder"],
        tmp_path / "cache",
        captions=captions,
        settings=FitSettings(refine_steps=0),
    )
    assert t.identity.details["features"]["truncation"] == "fusion"
    x = [sound(0.5), sound(2.0, seed=4)]
    assert t.embed(x).tobytes() == t.embed(x).tobytes()


# --- fitting and caching -----------------------------------------------------------------------


def test_first_load_fits_and_caches(tower, models):
    assert "clap-text" in tower.fit_stages and "clip-text" in tower.fit_stages
    assert "fit" in tower.fit_stages
    cached = list(Path(tower.cache_dir).glob("audio-projector-*.safetensors"))
    assert len(cached) == 1
    assert models["encoder"].identity.key in cached[0].name
    meta = load_projector(cached[0]).meta
    assert meta["clip"] == models["encoder"].identity.key
    assert meta["clap"] == tower.identity.weights
    assert meta["method"] in ("ridge", "ridge+contrastive")


def test_second_load_reuses_the_cache(tower, models, captions, monkeypatch):
    def no_fit(*a, **k):
        raise AssertionError("refit although a cached projector exists")

    monkeypatch.setattr(clap_projector, "fit_projector", no_fit)
    again = load_audio_tower(
        str(models["clap"]), models["encoder"], tower.cache_dir, captions=captions, settings=FAST
    )
    assert again.projector.hash == tower.projector.hash


def test_refit_fits_again(tower, models, captions):
    stages = []
    again = load_audio_tower(
        str(models["clap"]),
        models["encoder"],
        tower.cache_dir,
        captions=captions,
        settings=FAST,
        refit=True,
        progress=lambda s, d, t: stages.append(s),
    )
    assert "fit" in stages
    assert again.projector.hash == tower.projector.hash  # the fit itself is deterministic


def test_other_captions_or_settings_get_their_own_fit(tower, models, captions):
    stages = []
    load_audio_tower(
        str(models["clap"]),
        models["encoder"],
        tower.cache_dir,
        captions=captions[:300],
        settings=FAST,
        progress=lambda s, d, t: stages.append(s),
    )
    assert "fit" in stages
    assert len(list(Path(tower.cache_dir).glob("audio-projector-*.safetensors"))) == 2


def test_damaged_cache_entry_is_refit(models, captions, tmp_path):
    t = load_audio_tower(
        str(models["clap"]),
        models["encoder"],
        tmp_path,
        captions=captions,
        settings=FitSettings(refine_steps=0),
    )
    (cached,) = tmp_path.glob("audio-projector-*.safetensors")
    cached.write_bytes(b"garbage")
    again = load_audio_tower(
        str(models["clap"]),
        models["encoder"],
        tmp_path,
        captions=captions,
        settings=FitSettings(refine_steps=0),
    )
    assert again.projector.hash == t.projector.hash
    assert load_projector(cached).hash == t.projector.hash


def test_projector_in_a_fine_tuned_model_dir_is_used(
    tower, models, captions, tmp_path, monkeypatch
):
    from mmsearch.encoders.clip import load_clip

    tuned = tmp_path / "tuned"
    shutil.copytree(models["clip"], tuned)
    p = tower.projector
    mine = Projector(p.weight * 2, p.bias, dict(p.meta, method="finetuned"))
    save_projector(mine, tuned / PROJECTOR_FILENAME)
    enc = load_clip(ModelSpec.parse(str(tuned)), EncoderOptions(device="cpu", precision="fp32"))
    monkeypatch.setattr(clap_projector, "fit_projector", lambda *a, **k: pytest.fail("fitted"))
    t = load_audio_tower(
        str(models["clap"]), enc, tmp_path / "cache", captions=captions, settings=FAST
    )
    assert t.projector.hash == mine.hash and t.identity.details["projector_fit"] == "finetuned"


def test_projector_fitted_for_other_clap_weights_is_refused(tower, models, tmp_path):
    other = Projector(tower.projector.weight, tower.projector.bias, {"clap": "0123456789abcdef"})
    path = save_projector(other, tmp_path / "p.safetensors")
    with pytest.raises(ModelError, match="fitted for audio model weights"):
        load_audio_tower(str(models["clap"]), models["encoder"], tmp_path, projector=path)


def test_projector_with_wrong_dimensions_is_refused(models, tmp_path):
    bad = Projector(np.zeros((10, 32), np.float32), np.zeros(32, np.float32))
    with pytest.raises(ModelError, match="24-d"):
        load_audio_tower(str(models["clap"]), models["encoder"], tmp_path, projector=bad)
    bad = Projector(np.zeros((24, 7), np.float32), np.zeros(7, np.float32))
    with pytest.raises(ModelError, match="32-d"):
        load_audio_tower(str(models["clap"]), models["encoder"], tmp_path, projector=bad)


def test_missing_audio_model_is_a_model_error(models, tmp_path):
    with pytest.raises(ModelError, match="could not load audio model"):
        load_audio_tower(str(tmp_path / "nope"), models["encoder"], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="could not load audio model"):
        load_audio_tower(str(empty), models["encoder"], tmp_path)


def test_projector_save_load_roundtrip_and_damage(tmp_path):
    rng = np.random.default_rng(0)
    p = Projector(
        rng.standard_normal((24, 32)).astype(np.float32),
        rng.standard_normal(32).astype(np.float32),
        {"method": "ridge", "n": "3"},
    )
    path = save_projector(p, tmp_path / "sub" / "p.safetensors")
    q = load_projector(path)
    assert q.hash == p.hash and q.meta["method"] == "ridge" and q.meta["format_version"] == "1"
    np.testing.assert_array_equal(q(np.ones((2, 24))), p(np.ones((2, 24))))
    lin = p.as_linear()
    assert Projector.from_linear(lin).hash == p.hash
    assert not list((tmp_path / "sub").glob(".*tmp"))  # written atomically, no leftovers
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelError):
        load_projector(tmp_path / "bad.safetensors")
    from safetensors.numpy import save_file

    save_file({"weight": p.weight, "bias": p.bias}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="not an mmsearch audio projector"):
        load_projector(tmp_path / "other.safetensors")


def test_fit_recovers_a_known_map():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 24))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = rng.standard_normal((24, 32))
    y = x @ a + 0.3 + 0.05 * rng.standard_normal((1500, 32))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    p = fit_projector_from_embeddings(x[:1200], y[:1200], FAST)
    fitted = retrieval_scores(p(x[1200:]), y[1200:])
    random = retrieval_scores(x[1200:] @ rng.standard_normal((24, 32)), y[1200:])
    assert fitted[0] > 0.9 and random[0] < 0.05
    assert float(p.meta["val_r1"]) > 0.9


def test_fit_projector_bridges_two_related_text_towers(models):
    """The whole fit path (caption embedding in length-sorted batches, ridge, refinement) on the
    tiny CLAP and a stand-in CLIP text tower that is a fixed nonlinear function of CLAP's text
    space: held-out captions must find their own target far above chance."""
    from mmsearch.encoders.base import Encoder, Tower

    clap = load_clap(str(models["clap"]))
    a = np.random.default_rng(0).standard_normal((24, 32)).astype(np.float32)

    class Related(Tower):
        dim = 32

        def embed_batch(self, batch):
            return np.tanh(3 * clap.embed_text(list(batch)) @ a)

    enc = Encoder(identity=EncoderIdentity("related", "related"), dim=32, text=Related())
    caps = read_captions()
    order = np.random.default_rng(1).permutation(len(caps))
    test = [caps[i] for i in order[:300]]
    train = [caps[i] for i in order[300:1500]]
    p = fit_projector(clap, enc, train, FitSettings(refine_steps=50))
    x, y = clap.embed_text(test), enc.encode_text(test)
    fitted_r1, _ = retrieval_scores(p(x), y)
    random_r1 = max(
        retrieval_scores(x @ np.random.default_rng(s).standard_normal((24, 32)), y)[0]
        for s in range(5)
    )
    assert fitted_r1 > 0.3 and random_r1 < 0.05
    assert p.meta["clip"] == "related" and p.meta["n_captions"] == "1200"


def test_fit_on_tiny_random_towers_explains_held_out_variance(models):
    """Two random text towers share little, but least squares must still find what there is:
    on held-out captions the fit beats predicting the mean, and a random map does far worse."""
    clap = load_clap(str(models["clap"]))
    caps = read_captions()[::3]
    x = clap.embed_text(caps)
    y = models["encoder"].encode_text(caps)
    order = np.random.default_rng(1).permutation(len(caps))
    test, train = order[:300], order[300:]
    p = fit_projector_from_embeddings(x[train], y[train], FitSettings(refine_steps=0))

    def sq_error(pred):
        pred = pred / np.linalg.norm(pred, axis=1, keepdims=True)
        return float(((y[test] - pred) ** 2).sum())

    mean_only = sq_error(np.tile(y[train].mean(0), (len(test), 1)))
    assert sq_error(p(x[test])) < mean_only
    w = np.random.default_rng(0).standard_normal((x.shape[1], y.shape[1]))
    assert sq_error(x[test] @ w) > mean_only


def test_shipped_caption_corpus():
    caps = read_captions()
    assert 3000 <= len(caps) <= 10000
    assert len(set(caps)) == len(caps)
    assert all(c and c == c.strip() and not c.startswith("#") for c in caps)
    assert any("dog" in c and "bark" in c for c in caps)


def test_loading_prints_nothing(models, capfd):
    capfd.readouterr()
    load_clap(str(models["clap"]))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
