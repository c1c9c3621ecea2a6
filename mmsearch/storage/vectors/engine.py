"""Which engine answers a search: faiss on the CPU, faiss on the GPU(s), or torch on a GPU.

The one choice point for every search (`Searcher` asks `open_engine`; `mmsearch info` asks
`choose` through `describe_engines`). The choice itself is a pure function of what this process
can use (`Capabilities`, from `probe`), so its rules are tested without a GPU:

- `--device cpu` (or mps): faiss on the CPU.
- `auto` in a one-shot process (a CLI search: torch not loaded, `Searcher.warm` not called):
  faiss on the CPU. A scan of 100k vectors takes ~15 ms; starting CUDA takes a second or more.
- A faiss built with GPU support (faiss-gpu, faiss-gpu-cuvs) that sees GPUs: the on-disk CPU
  index (the format never changes) copied onto them at open (`gpu_placement`): on one GPU in
  fp32 when it fits, else in fp16 (exact indexes only: an IVF index keeps its list encoding),
  else sharded over every GPU (`index_cpu_to_all_gpus`), else not at all.
- Else torch sees a CUDA device: every vector in fp16 on it, exact (`torch_exact`).
- Else faiss on the CPU, with the reason.

CAGRA (cuVS) is not used: it needs its own graph built at open (minutes at 1M vectors), where the
IVF lists on disk copy straight onto the GPU.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .faiss_index import FILTER_SCAN_BELOW, FLAT, is_ivf, ivf_encoding, ivf_lists

FAISS_CPU, FAISS_GPU, TORCH = "faiss-cpu", "faiss-gpu", "torch"
GPU_MAX_K = 2048  # faiss's GPU k-selection (and nprobe) limit; deeper searches go to the CPU
GPU_RESERVE = 1536 << 20  # per GPU: faiss's scratch memory (StandardGpuResources' default)
_IVF_BYTES = {"Flat": 4, "SQfp16": 2, "SQ8": 1}  # per dimension, as faiss_index._ENCODINGS


@dataclass(frozen=True)
class Capabilities:
    """What this process can search with (see `probe`)."""

    faiss_gpus: int = 0  # GPUs the installed faiss can use (0 with faiss-cpu)
    gpu_free: tuple[int, ...] = ()  # free bytes per GPU; () when unknown
    torch_cuda: bool = False  # torch is loaded (or was asked for) and sees a CUDA device
    resident: bool = False  # a long-lived process (a server, the library warmed)
    torch_asked: bool = True  # False: torch was not loaded, so not asked about CUDA


@dataclass(frozen=True)
class Engine:
    """Who answers: `name` (FAISS_CPU, FAISS_GPU, TORCH), where, and why."""

    name: str = FAISS_CPU
    gpus: int = 0  # GPUs holding the vectors
    fp16: bool = False  # vectors stored in fp16 on the GPU(s) (cosines to ~1e-3)
    shard: bool = False  # split over `gpus` GPUs (each holds a part)
    reason: str = ""
    device: str = "cpu"  # where the vectors are: cpu, cuda or cuda:N (tests run TORCH on cpu)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = ""
        if self.gpus:
            kind = "sharded over" if self.shard else "on"
            where = f" {kind} {self.gpus} GPU{'s' if self.gpus > 1 else ''}"
            where += ", fp16" if self.fp16 else ", fp32"
        return f"{self.name}{where} ({self.reason})"


def gpu_bytes(index_type: str, n: int, dim: int, fp16: bool = False) -> int:
    """GPU memory the vectors of an index of that type take there (without faiss's scratch)."""
    if not is_ivf(index_type):
        return n * dim * (2 if fp16 else 4)  # the id map stays on the host
    per_dim = _IVF_BYTES.get(ivf_encoding(index_type), 4)
    return n * (dim * per_dim + 8) + ivf_lists(n) * dim * 4  # codes, 64-bit ids, centroids


def gpu_placement(index_type: str, n: int, dim: int, free: Sequence[int]) -> Engine | None:
    """Where an index fits on GPUs with `free` bytes each: one GPU in fp32, else one in fp16
    (exact indexes), else sharded over all of them (fp32, then fp16); None when it fits nowhere.
    Unknown free memory (`free` empty) counts as fitting on one GPU: opening fails over to the
    CPU if it does not."""
    if not free:
        return Engine(FAISS_GPU, 1, device="cuda")
    usable = [max(0, f - GPU_RESERVE) for f in free]
    precisions = (False,) if is_ivf(index_type) else (False, True)
    for fp16 in precisions:
        if gpu_bytes(index_type, n, dim, fp16) <= usable[0]:
            return Engine(FAISS_GPU, 1, fp16, device="cuda")
    if len(usable) > 1:
        for fp16 in precisions:
            if math.ceil(gpu_bytes(index_type, n, dim, fp16) / len(usable)) <= min(usable):
                return Engine(FAISS_GPU, len(usable), fp16, shard=True, device="cuda")
    return None


def choose(device: str, index_type: str, n: int, dim: int, caps: Capabilities) -> Engine:
    """The engine that answers searches of an index of `index_type` holding n vectors
    (`device`: auto, cpu, mps, cuda or cuda:N)."""
    if not wants_gpu(device):
        return Engine(reason=f"--device {device}")
    if device == "auto" and not caps.resident:
        return Engine(reason="one-shot search: a CPU scan answers before a GPU has started")
    too_big = None
    if caps.faiss_gpus > 0:
        placed = gpu_placement(index_type, n, dim, caps.gpu_free[: caps.faiss_gpus])
        if placed is not None:
            why = "faiss sees GPUs"
            on = device if device.startswith("cuda:") else "cuda"
            return Engine(placed.name, placed.gpus, placed.fp16, placed.shard, why, on)
        too_big = "the index does not fit the GPUs' memory"
    if caps.torch_cuda:
        need = gpu_bytes(FLAT, n, dim, fp16=True) + n * 8
        if not caps.gpu_free or need <= caps.gpu_free[0] - GPU_RESERVE:
            why = "faiss has no GPU support; torch sees a GPU"
            return Engine(TORCH, 1, True, reason=why, device=device if device != "auto" else "cuda")
        too_big = "the index does not fit the GPU's memory"
    if too_big or caps.torch_asked:
        return Engine(reason=too_big or "no GPU that faiss or torch can use")
    return Engine(reason="faiss has no GPU support and torch is not loaded; --device cuda loads it")


def wants_gpu(device: str) -> bool:
    return device == "auto" or device == "cuda" or device.startswith("cuda:")


def probe(device: str, resident: bool) -> Capabilities:
    """What this process can use. Cheap for a one-shot CLI search: nothing is asked of CUDA and
    torch is not imported unless `--device cuda` asked for a GPU."""
    if not wants_gpu(device) or (device == "auto" and not resident):
        return Capabilities(resident=resident)
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    torch_cuda, free = False, ()
    asked = "torch" in sys.modules or device != "auto"
    if asked:
        import torch

        torch_cuda = torch.cuda.is_available()
        if torch_cuda:
            free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
            first = int(device.partition(":")[2] or 0)  # cuda:N: GPU N is the one to fit
            free = tuple(free[first : first + 1] + free[:first] + free[first + 1 :])
    return Capabilities(gpus, free, torch_cuda, resident, asked)


def describe_engines(index_type: str, n: int, dim: int) -> dict[str, Engine]:
    """Who answers a one-shot CLI search ("search") and a long-lived process such as
    `mmsearch serve` ("serve") of such an index in this environment, with --device auto."""
    return {
        "search": choose("auto", index_type, n, dim, probe("auto", False)),
        "serve": choose("auto", index_type, n, dim, probe("auto", True)),
    }


def open_engine(col, device: str, resident: bool):
    """(Engine, the object that answers: VectorIndex's `search(query, k, allowed)` contract) for
    the open collection `col`."""
    vectors = col.vectors
    caps = probe(device, resident or "torch" in sys.modules)  # torch loaded: a resident process
    engine = choose(device, vectors.index_type, vectors.ntotal, col.dim, caps)
    if engine.name == FAISS_GPU:
        try:
            return engine, GpuFaissIndex(vectors, engine)
        except (RuntimeError, MemoryError) as e:  # out of GPU memory, an unsupported index
            return Engine(reason=f"faiss could not move the index to the GPU: {e}"), vectors
    if engine.name == TORCH:
        from .torch_exact import TorchExactIndex

        return engine, TorchExactIndex(col.catalog, col.dim, engine.device)
    return engine, vectors


def gpu_answers(k: int, nprobe: int | None, share: float) -> bool:
    """Whether the GPU copy can answer a search for k hits (after the over-fetch a filter needs)
    probing `nprobe` lists (None: exact), or it goes to the CPU index: faiss's GPU search has no
    id filter, so a filtered one fetches k / share and keeps the allowed hits; a filter passing
    under FILTER_SCAN_BELOW of the vectors, a k or nprobe past the GPU's limit, go to the CPU."""
    if share < FILTER_SCAN_BELOW:
        return False
    return filtered_k(k, share) <= GPU_MAX_K and (nprobe is None or nprobe <= GPU_MAX_K)


def filtered_k(k: int, share: float) -> int:
    """How many hits to fetch so that k of them pass a filter letting through `share` of the
    vectors (with a margin); k itself without a filter."""
    return k if share >= 1.0 else math.ceil(2 * k / share) + 16


class GpuFaissIndex:
    """A VectorIndex's faiss index copied onto the GPU(s); `search` has VectorIndex's contract.
    What the GPU cannot answer (`gpu_answers`), or a filtered search whose over-fetch came back
    with fewer than k allowed hits, is answered by the CPU index it was copied from."""

    def __init__(self, cpu, engine: Engine):
        import faiss

        self.cpu, self.engine, self.dim = cpu, engine, cpu.dim
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = engine.fp16
        options.shard = engine.shard
        if engine.shard:
            self.gpu = faiss.index_cpu_to_all_gpus(cpu.index, co=options, ngpu=engine.gpus)
        else:
            self.resources = faiss.StandardGpuResources()
            gpu = int(engine.device.partition(":")[2] or 0)
            self.gpu = faiss.index_cpu_to_gpu(self.resources, gpu, cpu.index, options)

    @property
    def ntotal(self) -> int:
        return self.cpu.ntotal

    def for_catalog(self, catalog) -> GpuFaissIndex:
        return self  # holds no catalog connection

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        total = self.ntotal
        n = total if allowed is None else min(total, len(allowed))
        k = min(k, n)
        if k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        share = n / max(total, 1)
        nprobe = None if self.cpu.exact else self.cpu._probes(k, n)
        if not gpu_answers(k, nprobe, share):
            return self.cpu.search(query, k, allowed)
        want = min(filtered_k(k, share), total)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        params = None if nprobe is None else faiss.SearchParametersIVF(nprobe=int(nprobe))
        try:
            scores, ids = self.gpu.search(q, want, params=params)
        except RuntimeError:  # a faiss build whose GPU (or sharded) index refuses the params
            return self.cpu.search(query, k, allowed)
        keep = ids[0] >= 0
        if allowed is not None:
            keep &= np.isin(ids[0], allowed)
        if keep.sum() < k and (allowed is not None or nprobe is not None):
            return self.cpu.search(query, k, allowed)  # the filter or the lists held too few
        return scores[0][keep][:k], ids[0][keep][:k]


__all__ = [
    "FAISS_CPU", "FAISS_GPU", "GPU_MAX_K", "TORCH", "Capabilities", "Engine",
    "GpuFaissIndex", "choose", "describe_engines", "filtered_k", "gpu_answers", "gpu_bytes", "gpu_placement",
    "open_engine", "probe", "wants_gpu",
]  # fmt: skip
