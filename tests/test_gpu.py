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
