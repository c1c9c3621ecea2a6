"""GPU end to end, side by side in one run (issue 15): under 10 minutes on one GPU.

1. Images/s of a random-weight ViT-B-32 (fp16): indexing JPEG files from disk end to end
   (`index_paths`: walk, hash, nvjpeg decode, encode, commit) vs decoding alone (nvjpeg, resize,
   crop: loaders.gpu_jpeg) vs the encoder alone; ratio end to end / the slower of the two.
2. Exact search over 1M and 10M x 512 vectors (fp16, torch: the TORCH engine's matmul + top-k;
   faiss-gpu where the installed faiss has GPU support): one-query latency and queries/s against
   the memory-bandwidth floor measured in the same run (one read of the vectors).
3. IVF (faiss, mmsearch's own index and nprobe tuning) on 1M clustered vectors: recall@10 and
   queries/s, on the GPU where faiss has GPU support, else on this machine's CPUs.
4. Fine-tuning samples/s (`mmsearch.finetune`, method full, auto precision) vs a bare open_clip
   training step (ClipLoss + AdamW + autocast) on the same batch size: the step's ceiling.

`--smoke` runs every part at toy sizes on the CPU (tests/test_bench_gpu.py does, so the script
is known to run before a GPU is lent).

On the device (`run` tool): its image has torch, torchvision, numpy, pillow, typer, safetensors,
timm, regex; carry open_clip and faiss-cpu as wheels. Once, here, in the repository root:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 \
      wcwidth==0.7.0 faiss-cpu==1.15.1

(.whl/ is git-ignored; about 20 MB). Then run, with carry [".whl"] and timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \
      PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py 2>&1 | tee $OUT/bench_gpu.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = dict(images=2048, image_size=(640, 480), batch=256, search=(1_000_000, 10_000_000),
            ivf=1_000_000, queries=200, pairs=2048, ft_batch=128, epochs=2)  # fmt: skip
SMOKE = dict(images=16, image_size=(96, 72), batch=8, search=(2_000, 5_000),
             ivf=4_000, queries=20, pairs=32, ft_batch=8, epochs=1, workers=0)  # fmt: skip
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
DIM = 512


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 5) -> float:
    """Median seconds of `fn()` after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def model_dir(work: Path, smoke: bool) -> Path:
    """A random-weight ViT-B-32 (a tiny model with --smoke) in local-dir layout."""
    import open_clip
    import torch

    from mmsearch.encoders.clip import save_model_dir

    torch.manual_seed(0)
    if smoke:
        return save_model_dir(open_clip.CLIP(**TINY_CFG), TINY_CFG, work / "tiny", {"size": 32})
    from open_clip.factory import get_model_config

    cfg = get_model_config("ViT-B-32")
    return save_model_dir(open_clip.create_model("ViT-B-32"), cfg, work / "vitb32")


def write_photos(folder: Path, n: int, size) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        grain = rng.integers(-12, 12, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(np.asarray(img, int) + grain, 0, 255).astype(np.uint8))
        paths.append(folder / f"p{i:05}.jpg")
        img.save(paths[-1], "JPEG", quality=90)
    return paths


# --- 1. images/s --------------------------------------------------------------------------------


def bench_images(work: Path, model: Path, size: dict, device: str) -> dict:
    import torch

    from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec
    from mmsearch.encoders import create_encoder
    from mmsearch.loaders import gpu_jpeg
    from mmsearch.loaders.image import JpegBytes
    from mmsearch.pipeline.run import index_paths

    paths = write_photos(work / "photos", size["images"], size["image_size"])
    spec = ModelSpec.parse(str(model))
    enc = create_encoder(spec, EncoderOptions(model=spec, device=device))
    batch = size["batch"]
    blobs = [JpegBytes(p.read_bytes()) for p in paths]

    def decode_all():
        for s in range(0, len(blobs), batch):
            gpu_jpeg.decode_batch(blobs[s : s + batch], enc.prep, device)

    h, w = enc.prep.size
    pictures = torch.randint(0, 255, (batch, h, w, 3), dtype=torch.uint8, device=device)
    runs = max(1, len(blobs) // batch)

    def encode_all():
        for _ in range(runs):
            enc.image.embed_batch(list(pictures))

    decode = len(blobs) / timed(decode_all, device, 3)
    encode = runs * batch / timed(encode_all, device, 3)
    options = IndexOptions(roots=(work / "photos",), root_dir=work / "indexes",
                           encoder=EncoderOptions(model=spec, device=device), batch_size=batch,
                           workers=size.get("workers"))  # fmt: skip
    if device == "cuda":  # model load, CUDA kernels: then a fresh index is timed
        index_paths(replace(options, name="warm"))
    t = time.perf_counter()
    report = index_paths(options)
    end_to_end = report.added / (time.perf_counter() - t)
    slower = min(decode, encode)
    return {"end_to_end": end_to_end, "decode": decode, "encode": encode,
            "ratio": end_to_end / slower, "files": report.added}  # fmt: skip


# --- 2. exact search ------------------------------------------------------------------------------


def bench_exact(n: int, device: str, queries: int) -> dict:
    """The TORCH engine's scan (fp16 matmul + top-k) vs one read of the vectors."""
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    vecs = torch.randn(n, DIM, generator=g, device=device, dtype=dtype)
    vecs /= vecs.norm(dim=1, keepdim=True)
    qs = torch.randn(queries, DIM, generator=g, device=device, dtype=dtype)
    floor = timed(lambda: vecs.sum(dtype=torch.float32), device, 10)
    one = timed(lambda: torch.topk(vecs @ qs[0], 18).indices.cpu(), device, 20)
    many = timed(lambda: torch.topk(vecs @ qs[:64].T, 18, dim=0).indices.cpu(), device, 5)
    gbs = vecs.numel() * vecs.element_size() / floor / 1e9
    return {"n": n, "floor_ms": floor * 1e3, "latency_ms": one * 1e3, "ratio": one / floor,
            "qps_batch64": 64 / many, "bandwidth_gbs": gbs, "queries": qs.float().cpu().numpy()}  # fmt: skip


def bench_faiss_gpu_exact(n: int, queries: np.ndarray) -> dict:
    """The FAISS_GPU engine's exact index (fp32), on the same sizes and queries."""
    import faiss

    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatIP(res, DIM)
    host = np.random.default_rng(0).standard_normal((n, DIM), dtype=np.float32)
    index.add(host / np.linalg.norm(host, axis=1, keepdims=True))
    return {
        "faiss_latency_ms": timed(lambda: index.search(queries[:1], 10), "cpu", 20) * 1e3,
        "faiss_qps_batch64": 64 / timed(lambda: index.search(queries[:64], 10), "cpu", 5),
    }


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


# --- 3. IVF ---------------------------------------------------------------------------------------


def bench_ivf(n: int, queries: int) -> dict:
    from mmsearch.storage.vectors import VectorIndex, choose_type, shifted
    from mmsearch.storage.vectors.engine import FAISS_GPU, Engine, GpuFaissIndex

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(8, n // 1000), DIM)).astype(np.float32)
    vecs = centres[rng.integers(0, len(centres), n)]
    vecs += 0.6 * rng.standard_normal(vecs.shape, dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    index_type = choose_type(n, DIM, "ivf")
    vi = VectorIndex.create(index_type, DIM)
    t = time.perf_counter()
    sample = vecs[rng.choice(n, min(n, 40 * vi.nlist), replace=False)]
    vi.train(sample, n)
    vi.add(ids, vecs)
    build = time.perf_counter() - t
    held = rng.choice(n, queries, replace=False)
    exact = VectorIndex.create("IDMap2,FlatIP", DIM)
    exact.add(ids, vecs)
    qs = shifted(vecs[held])
    truth = exact.index.search(vecs[held], 11)[1]
    shifted_truth = exact.index.search(qs, 10)[1]
    nprobe, recall = vi.tune(held, vecs[held], truth, shifted_truth)
    searcher = GpuFaissIndex(vi, Engine(FAISS_GPU, 1, device="cuda")) if _faiss_gpus() else vi
    t = time.perf_counter()
    for q in qs:
        searcher.search(q, 10)
    qps = len(qs) / (time.perf_counter() - t)
    return {"n": n, "type": index_type, "nprobe": nprobe, "recall": recall,
            "recall_shifted": vi.recall_shifted, "qps": qps, "build_s": build,
            "where": "faiss-gpu" if _faiss_gpus() else "faiss-cpu"}  # fmt: skip


# --- 4. fine-tuning -------------------------------------------------------------------------------


def bench_finetune(work: Path, model: Path, size: dict, device: str) -> dict:
    import open_clip
    import torch

    from mmsearch.finetune import FinetuneConfig, finetune, read_pairs

    folder = work / "pairs"
    paths = write_photos(folder, size["pairs"], (256, 256))
    csv = folder / "pairs.csv"
    csv.write_text(
        "path,caption\n" + "".join(f"{p.name},photo number {i}\n" for i, p in enumerate(paths))
    )
    batch = size["ft_batch"]
    cfg = FinetuneConfig(model=str(model), out=work / "tuned", method="full", epochs=size["epochs"],
                         batch_size=batch, device=device, plot=False, val_fraction=0.1)  # fmt: skip
    result = finetune(read_pairs(csv), cfg)
    ours = result.samples_per_s

    # the bare step: open_clip's model, ClipLoss, AdamW, autocast; inputs already on the device
    net = open_clip.create_model(f"local-dir:{model}", device=device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    loss_fn = open_clip.ClipLoss()
    side = net.visual.image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    images = torch.randn(batch, 3, side, side, device=device)
    texts = torch.randint(1, 49000, (batch, net.context_length), device=device)
    amp = torch.bfloat16 if device == "cuda" else None

    def step():
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            img, txt, scale = net(images, texts)[:3]
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    bare = batch / timed(step, device, 5)
    return {"finetune_sps": ours, "bare_step_sps": bare, "ratio": ours / bare}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (a test runs it)")
    args = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        torch.set_num_threads(1)
    size = SMOKE if args.smoke else FULL
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    started = time.perf_counter()
    print(f"bench_gpu on {name} ({device}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_dir(work, args.smoke)
        im = bench_images(work, model, size, device)
        print(f"images/s  end to end {im['end_to_end']:.0f} | decode alone {im['decode']:.0f} | "
              f"encoder alone {im['encode']:.0f} | end to end / slower {im['ratio']:.2f} "
              f"({im['files']} files)")  # fmt: skip
        for n in size["search"]:
            ex = bench_exact(n, device, size["queries"])
            if _faiss_gpus():
                ex.update(bench_faiss_gpu_exact(n, ex["queries"]))
            line = (f"exact {n:>10,} x {DIM}: 1 query {ex['latency_ms']:.3f} ms vs floor "
                    f"{ex['floor_ms']:.3f} ms ({ex['bandwidth_gbs']:.0f} GB/s) = {ex['ratio']:.2f}x | "
                    f"{ex['qps_batch64']:.0f} q/s in batches of 64")  # fmt: skip
            if "faiss_latency_ms" in ex:
                line += (f" | faiss-gpu {ex['faiss_latency_ms']:.3f} ms, "
                         f"{ex['faiss_qps_batch64']:.0f} q/s")  # fmt: skip
            print(line)
        iv = bench_ivf(size["ivf"], size["queries"])
        print(f"ivf   {iv['n']:>10,} x {DIM} {iv['type']} ({iv['where']}): nprobe {iv['nprobe']}, "
              f"recall@10 {iv['recall']:.3f} (off the data {iv['recall_shifted']:.3f}), "
              f"{iv['qps']:.0f} q/s one at a time, built in {iv['build_s']:.1f} s")  # fmt: skip
        ft = bench_finetune(work, model, size, device)
        print(f"finetune samples/s {ft['finetune_sps']:.0f} vs bare open_clip step "
              f"{ft['bare_step_sps']:.0f} = {ft['ratio']:.2f}")  # fmt: skip
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
