"""GPU path: fp16 towers on CUDA agree with the CPU fp32 path. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_fp16_matches_cpu(tiny_model):
    from mmsearch.config import EncoderOptions, ModelSpec
    from mmsearch.encoders import create_encoder

    spec = ModelSpec.parse(str(tiny_model))
    cpu = create_encoder(spec, EncoderOptions(device="cpu", precision="fp32"))
    gpu = create_encoder(spec, EncoderOptions(device="cuda"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    texts = ["a dog", "a cat on a mat", "!~"]
    assert (cpu.encode_image(images) * gpu.encode_image(images)).sum(1).min() > 0.99
    assert (cpu.encode_text(texts) * gpu.encode_text(texts)).sum(1).min() > 0.99


# --- search: faiss indexes copied onto the GPU (faiss-gpu builds only) ---------------------------


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


needs_faiss_gpu = pytest.mark.skipif(
    torch.cuda.is_available() and _faiss_gpus() == 0, reason="needs a faiss built with GPU support"
)


@needs_faiss_gpu
@pytest.mark.parametrize("index_type", ["IDMap2,FlatIP", "IVF64,Flat", "IVF64,SQfp16"])
@pytest.mark.parametrize("fp16", [False, True])
def test_faiss_gpu_copy_answers_as_the_cpu_index(index_type, fp16):
    from mmsearch.storage.vectors import VectorIndex
    from mmsearch.storage.vectors.engine import FAISS_GPU, Engine, GpuFaissIndex

    rng = np.random.default_rng(0)
    dim, n = 64, 20_000
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cpu = VectorIndex.create(index_type, dim)
    if not cpu.exact:
        cpu.train(vecs, n)
        cpu.ivf.nprobe = 64  # every list: both answers exact
    ids = np.arange(n, dtype=np.int64) * 2
    cpu.add(ids, vecs)
    gpus = min(_faiss_gpus(), 2)
    for engine in [Engine(FAISS_GPU, 1, fp16, device="cuda")] + [
        Engine(FAISS_GPU, gpus, fp16, True, device="cuda")
    ] * (gpus > 1):
        gpu = GpuFaissIndex(cpu, engine)
        for q in vecs[:20]:
            for allowed in (None, ids[: n * 3 // 4]):
                want, got = cpu.search(q, 10, allowed), gpu.search(q, 10, allowed)
                overlap = len(np.intersect1d(want[1], got[1]))
                assert overlap >= (9 if fp16 or "SQ" in index_type else 10)
                np.testing.assert_allclose(got[0][:5], want[0][:5], atol=2e-3 if fp16 else 1e-4)


def test_a_warmed_searcher_on_a_gpu_picks_a_gpu_engine(indexed_photos):
    from mmsearch.config import SearchOptions
    from mmsearch.search import Searcher

    with Searcher(SearchOptions()) as s:
        s.warm()
        expected = "faiss-gpu" if _faiss_gpus() else "torch"
        assert s.engine.name == expected, s.engine
        assert s.search("a photo", k=3)


# --- indexing: JPEGs decoded by nvjpeg -------------------------------------------------------------


@pytest.fixture
def indexed_photos(tiny_model, tmp_path):
    from conftest import make_photo

    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, index_root
    from mmsearch.pipeline.run import index_paths

    root = tmp_path / "photos"
    for i in range(12):
        make_photo(root / f"p{i}.jpg", i, size=(320, 240))
    (root / "broken.jpg").write_bytes((root / "p0.jpg").read_bytes()[:2000])
    report = index_paths(
        IndexOptions(
            roots=(root,),
            root_dir=index_root(),
            encoder=EncoderOptions(model=ModelSpec.parse(str(tiny_model)), device="cuda"),
            workers=0,
        )
    )
    assert report.added == 12 and report.failed == 1
    return root


def test_nvjpeg_batch_matches_the_cpu_path_and_refusals_fall_back_alone():
    import io

    from conftest import smooth_picture

    from mmsearch.config import ImagePrep
    from mmsearch.loaders import gpu_jpeg
    from mmsearch.loaders.image import JpegBytes, decode_photo, open_image

    prep = ImagePrep(size=(224, 224))

    def jpeg(img, **kw):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **kw)
        return buf.getvalue()

    files = [jpeg(smooth_picture(i, (640, 480))) for i in range(6)]
    files[2] = jpeg(smooth_picture(2, (640, 480)), progressive=True)
    files[3] = jpeg(smooth_picture(3, (640, 480)).convert("CMYK"))
    files[4] = files[4][:3000]  # broken
    got = gpu_jpeg.decode_batch([JpegBytes(f) for f in files], prep, "cuda")
    assert isinstance(got[4], str)
    for i in (0, 1, 2, 3, 5):
        picture, _ = got[i]
        with open_image(io.BytesIO(files[i])) as img:
            want, _ = decode_photo(img, prep)
        diff = np.abs(picture.cpu().numpy().astype(int) - want.astype(int))
        assert diff.mean() < 1.5, (i, diff.mean())


def test_indexing_on_cuda_decodes_jpegs_there_and_finds_them(indexed_photos):
    from mmsearch.config import SearchOptions
    from mmsearch.search import Searcher

    with Searcher(SearchOptions(device="cuda")) as s:
        hits = s.search(image=indexed_photos / "p3.jpg", k=1)
    assert hits[0].path.endswith(b"p3.jpg")


# --- fine-tuning: mixed precision on CUDA ----------------------------------------------------------


@pytest.mark.parametrize("precision,device", [("fp16", "cuda"), ("bf16", "cuda:0")])
def test_a_tiny_finetune_runs_in_mixed_precision_on_cuda(tmp_path, precision, device):
    from conftest import write_tiny_model
    from test_finetune import CFG16, config, draw_shapes, write_csv

    from mmsearch.finetune import finetune, read_pairs

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    pairs = write_csv(tmp_path / "pairs.csv", draw_shapes(tmp_path, 60))
    base = write_tiny_model(tmp_path / "tiny16", cfg=CFG16)
    cfg = config(base, tmp_path / "out", "full", device=device, precision=precision, epochs=2)
    r = finetune(read_pairs(pairs), cfg)
    losses = [h["train_loss"] for h in r.history if h["train_loss"] is not None]
    assert r.samples_per_s > 0 and losses and np.isfinite(losses).all()
