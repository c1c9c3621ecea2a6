"""Shared benchmark helpers: the datasets folder and a random-weight ViT-B-32 in local-dir layout."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np


def _find_datasets() -> Path:
    """../shared/datasets beside the checkout; from a worktree (wt/NAME) it is one level higher."""
    here = Path(__file__).resolve()
    for parent in here.parents[1:]:
        if (parent / "shared" / "datasets").is_dir():
            return parent / "shared" / "datasets"
    return here.parents[2] / "shared" / "datasets"


DATASETS = _find_datasets()
OUT = Path(__file__).resolve().parent / "out"


def machine() -> str:
    import os

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"


def random_model_dir(arch: str = "ViT-B-32", seed: int = 0) -> Path:
    """open_clip `arch` with random weights, written once in local-dir layout and reused."""
    out = OUT / f"{arch}-random-{seed}"
    if (out / "open_clip_model.safetensors").is_file():
        return out
    import open_clip
    import torch
    from open_clip.factory import get_model_config

    from mmsearch.encoders.clip import save_model_dir

    torch.manual_seed(seed)
    cfg = get_model_config(arch)
    model = open_clip.create_model(arch)
    save_model_dir(model, json.loads(json.dumps(cfg)), out)
    return out


def clustered(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    """Synthetic clustered unit vectors: 1,000 centres plus spread with a decaying spectrum, so
    nearest neighbours are not trivially inside one cluster (IVF behaves as on real embeddings,
    unlike on isotropic noise)."""
    r = np.random.default_rng(123)
    centres = r.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spectrum = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    spectrum /= np.linalg.norm(spectrum)
    rotation = np.linalg.qr(r.standard_normal((dim, dim)))[0].astype(np.float32)
    mean = r.standard_normal(dim).astype(np.float32)
    mean *= 0.6 / np.linalg.norm(mean)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, clusters, m)] + mean
        x += (rng.standard_normal((m, dim)).astype(np.float32) * spectrum) @ rotation
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def padded_index(
    work: Path,
    items: int,
    photos: int = 20,
    model: str | None = None,
    query_model: str | None = None,
) -> Path:
    """An index root under `work` whose 'default' index holds `photos` real photos embedded by
    `model` (default a random-weight ViT-B-32; through index_paths, so the text tower is exported
    too; `query_model` made its query tower), padded to `items` vectors with synthetic catalog rows (clustered unit vectors): a
    search's cost depends on the number of vectors, not on where they came from. The vector index
    is then chosen as `mmsearch index` chooses it (exact below 300,000 vectors, a tuned IVF above).
    Returns the index root."""
    import os

    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec
    from mmsearch.pipeline.run import index_paths
    from mmsearch.records import FileEntry, Segment
    from mmsearch.storage.collection import Collection

    folder = work / "photos"
    folder.mkdir(parents=True)
    for p in sorted((DATASETS / "flickr8k_val1k" / "images").glob("*.jpg"))[:photos]:
        os.symlink(p, folder / p.name)
    root = work / "indexes"
    spec = ModelSpec.parse(model or str(random_model_dir("ViT-B-32")))
    encoder = EncoderOptions(model=spec)
    options = IndexOptions((folder,), root_dir=root, encoder=encoder, query_model=query_model)
    index_paths(options)
    with Collection.open_writer(root, "default") as col:
        pad = clustered(items - photos, col.dim, seed=0)
        with col.catalog.transaction():
            for i, v in enumerate(pad):
                entry = FileEntry(f"/synthetic/{i:07}.jpg".encode(), "image", 1000, i)
                fid = col.catalog.add_file(entry, f"h{i}")
                col.catalog.replace_units(fid, [Segment()], v[None])
        # Rows added straight to the catalog leave vectors.faiss behind it: load it (rebuilt
        # from the catalog) and save it, or every search would rebuild it from SQLite first.
        assert col.vectors.ntotal == items
        col.save_vectors(options)
    return root


def require_datasets() -> None:
    if not DATASETS.is_dir():
        raise SystemExit(f"datasets not found at {DATASETS} (see ../shared/datasets/README.md)")


def random_clap_dir(
    name: str,
    seed: int = 0,
    feature_extractor: dict | None = None,
    audio_config: dict | None = None,
    text_config: dict | None = None,
) -> Path:
    """A ClapModel with random weights and a BPE tokenizer trained on our caption corpus, in
    from_pretrained layout, written once under benchmarks/out/<name>-<seed> and reused. With no
    configs: laion/clap-htsat-unfused's architecture and feature settings (48 kHz, 10 s, 64 mels)."""
    out = OUT / f"{name}-{seed}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        RobertaTokenizer,
    )

    from mmsearch.encoders.clap import read_captions

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(
        read_captions(),
        trainers.BpeTrainer(
            vocab_size=2000,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
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
    fe_kwargs = feature_extractor or {"frequency_min": 50}
    fe = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad", **fe_kwargs)
    ClapProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(out)
    torch.manual_seed(seed)
    config = ClapConfig(text_config=text_config, audio_config=audio_config)
    ClapModel(config).save_pretrained(out)
    return out
