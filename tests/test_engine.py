"""Which engine answers a search (storage.vectors.engine): the choice from fake capabilities, and
the GPU copy's filtering and fallbacks with its GPU index stood in for by the CPU one."""

from __future__ import annotations

import numpy as np
import pytest

from mmsearch.storage.vectors import FLAT, VectorIndex
from mmsearch.storage.vectors.engine import (
    FAISS_CPU,
    FAISS_GPU,
    GPU_MAX_K,
    GPU_RESERVE,
    TORCH,
    Capabilities,
    Engine,
    GpuFaissIndex,
    choose,
    gpu_answers,
    gpu_bytes,
)

GIB = 1 << 30
IVF = "IVF4096,Flat"


def gpus(*free_gib: float, torch_cuda: bool = False) -> Capabilities:
    free = tuple(int(f * GIB) + GPU_RESERVE for f in free_gib)
    return Capabilities(faiss_gpus=len(free), gpu_free=free, torch_cuda=torch_cuda, resident=True)


def test_cpu_and_one_shot_searches_stay_on_faiss_cpu():
    caps = gpus(80, torch_cuda=True)
    assert choose("cpu", FLAT, 10**6, 512, caps).name == FAISS_CPU
    assert choose("mps", FLAT, 10**6, 512, caps).name == FAISS_CPU
    one_shot = Capabilities(faiss_gpus=1, torch_cuda=True, resident=False)
    assert choose("auto", FLAT, 10**6, 512, one_shot).name == FAISS_CPU
    # --device cuda asks for the GPU even in a one-shot process
    assert choose("cuda", FLAT, 10**6, 512, Capabilities(faiss_gpus=1)).name == FAISS_GPU
    on_second = choose("cuda:1", FLAT, 10**6, 512, Capabilities(faiss_gpus=2))
    assert (on_second.name, on_second.device) == (FAISS_GPU, "cuda:1")
    torch_second = choose("cuda:1", FLAT, 10**6, 512, Capabilities(torch_cuda=True))
    assert (torch_second.name, torch_second.device) == (TORCH, "cuda:1")


def test_faiss_gpu_precision_and_sharding_follow_memory():
    n, dim = 10_000_000, 512  # 19.1 GiB in fp32, 9.5 GiB in fp16
    assert gpu_bytes(FLAT, n, dim) == n * dim * 4
    one = choose("auto", FLAT, n, dim, gpus(40))
    assert (one.name, one.gpus, one.fp16, one.shard) == (FAISS_GPU, 1, False, False)
    half = choose("auto", FLAT, n, dim, gpus(16, 16))
    assert (half.gpus, half.fp16, half.shard) == (1, True, False)  # fp16 on one before sharding
    shard = choose("auto", FLAT, n, dim, gpus(8, 8, 8))
    assert (shard.gpus, shard.fp16, shard.shard) == (3, False, True)
    shard16 = choose("auto", FLAT, n, dim, gpus(5, 5))
    assert (shard16.gpus, shard16.fp16, shard16.shard) == (2, True, True)
    # the smallest GPU bounds a shard
    assert choose("auto", FLAT, n, dim, gpus(40, 1)).gpus == 1
    assert choose("auto", FLAT, n, dim, gpus(6, 3)).name == FAISS_CPU


def test_ivf_keeps_its_encoding_on_the_gpu():
    n, dim = 10_000_000, 512
    assert not choose("auto", IVF, n, dim, gpus(40)).fp16
    assert gpu_bytes("IVF4096,SQ8", n, dim) < gpu_bytes("IVF4096,SQfp16", n, dim)
    assert gpu_bytes("IVF4096,SQfp16", n, dim) < gpu_bytes(IVF, n, dim)
    # an IVF-Flat that needs 19.2 GiB: sharded over two 12 GB GPUs, never stored in fp16
    shard = choose("auto", IVF, n, dim, gpus(12, 12))
    assert (shard.gpus, shard.fp16, shard.shard) == (2, False, True)
    assert choose("auto", "IVF4096,SQ8", n, dim, gpus(12)).gpus == 1


def test_torch_answers_when_faiss_cannot_use_the_gpu():
    n, dim = 1_000_000, 512
    torch_only = Capabilities(gpu_free=(80 * GIB,), torch_cuda=True, resident=True)
    engine = choose("auto", FLAT, n, dim, torch_only)
    assert (engine.name, engine.fp16) == (TORCH, True)
    assert choose("auto", IVF, n, dim, torch_only).name == TORCH  # exact, from the catalog
    # too big for faiss's GPUs: torch is asked next, then the CPU answers, saying why
    too_small = Capabilities(1, (2 * GIB,), torch_cuda=True, resident=True)
    assert "does not fit" in choose("auto", FLAT, 10**8, dim, too_small).reason
    assert choose("auto", FLAT, n, dim, Capabilities(resident=True)).reason.startswith("no GPU")
    unasked = Capabilities(resident=True, torch_asked=False)
    assert "torch is not loaded" in choose("auto", FLAT, n, dim, unasked).reason
    # unknown free memory: tried on one GPU (opening falls back to the CPU should it fail)
    assert choose("auto", FLAT, n, dim, Capabilities(faiss_gpus=2, resident=True)).gpus == 1


def test_engine_says_where_it_runs():
    assert str(Engine(FAISS_GPU, 2, True, True, "x")) == "faiss-gpu sharded over 2 GPUs, fp16 (x)"
    assert str(Engine(reason="--device cpu")) == "faiss-cpu (--device cpu)"


def test_what_the_gpu_cannot_answer_goes_to_the_cpu():
    assert gpu_answers(10, None, 1.0) and gpu_answers(10, 64, 0.6)
    assert not gpu_answers(10, None, 0.3)  # a narrow filter: the CPU's id filter
    assert not gpu_answers(GPU_MAX_K + 1, None, 1.0)
    assert not gpu_answers(10, GPU_MAX_K + 1, 1.0)
    assert not gpu_answers(GPU_MAX_K // 2, None, 0.9)  # the filter's over-fetch passes the limit


def _stand_in(cpu: VectorIndex) -> GpuFaissIndex:
    """A GpuFaissIndex whose 'GPU' index is the CPU one: its own logic, run here."""
    g = GpuFaissIndex.__new__(GpuFaissIndex)
    g.cpu, g.engine, g.dim, g.gpu = cpu, Engine(FAISS_GPU, 1), cpu.dim, cpu.index
    return g


@pytest.mark.parametrize("index_type", [FLAT, "IVF16,Flat"])
def test_gpu_copy_answers_as_the_cpu_index_with_filters(index_type):
    rng = np.random.default_rng(0)
    dim, n = 16, 2000
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cpu = VectorIndex.create(index_type, dim)
    if not cpu.exact:
        cpu.train(vecs, n)
        cpu.ivf.nprobe = 16  # exhaustive: both answers are exact
    ids = np.arange(n, dtype=np.int64) * 3  # catalog ids need not be dense
    cpu.add(ids, vecs)
    gpu = _stand_in(cpu)
    for q in vecs[:5] + 0.1 * rng.standard_normal((5, dim)).astype(np.float32):
        for allowed in (None, ids[ids % 2 == 0], ids[:1500], ids[:40]):
            for k in (1, 10, 300):
                want = cpu.search(q, k, allowed)
                got = gpu.search(q, k, allowed)
                assert got[1].tolist() == want[1].tolist()
                np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
                assert allowed is None or np.isin(got[1], allowed).all()
