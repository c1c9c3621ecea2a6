"""Cold-start cost of embedding one query: the numpy text tower vs torch + open_clip.

Each measurement is a fresh `python` process (interpreter start included), repeated after one
unmeasured warm-up run, so the page cache is warm as it is for a user searching twice. Bytecode
caching is on (PYTHONDONTWRITEBYTECODE is dropped for the children), as in an installed package;
without it every mmsearch module is recompiled on each start. Random weights: the cost does not
depend on their values.

    python benchmarks/bench_fast_text.py                # ViT-B-32
    python benchmarks/bench_fast_text.py --model RN50 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERY = "a photo of a dog running on the beach"


def cold(code: str, repeat: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture name")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, help="reuse this directory for the model and export")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_fast_text."))
    model_dir, fast_dir = work / "model", work / "fast_text"
    if not (fast_dir / "config.json").is_file():
        import open_clip

        from mmsearch.encoders.clip import save_model_dir
        from mmsearch.encoders.query_text import export_fast_text

        model = open_clip.create_model(args.model).eval()
        tokenizer = open_clip.get_tokenizer(args.model)
        cfg = open_clip.get_model_config(args.model)
        save_model_dir(model, cfg, model_dir, model.visual.preprocess_cfg)
        t0 = time.perf_counter()
        ok = export_fast_text(model, tokenizer, fast_dir)
        print(f"export (with verification): {time.perf_counter() - t0:.1f} s, ok={ok}")
        if not ok:
            sys.exit(f"{args.model} is not supported by the fast text tower")
        del model

    cases = {
        "python -c pass": "pass",
        "import numpy": "import numpy",
        "fast: import + load + embed": (
            "from pathlib import Path\n"
            "from mmsearch.encoders.query_text import FastTextTower\n"
            f"FastTextTower.load(Path({str(fast_dir)!r})).embed([{QUERY!r}])"
        ),
        "import torch, open_clip": "import torch, open_clip",
        "torch: load_clip + embed": (
            "from mmsearch.config import EncoderOptions, ModelSpec\n"
            "from mmsearch.encoders.clip import load_clip\n"
            f"enc = load_clip(ModelSpec.parse({str(model_dir)!r}), EncoderOptions(device='cpu',"
            " precision='fp32'))\n"
            f"enc.encode_text([{QUERY!r}])"
        ),
    }
    print(f"{args.model}, {args.repeat} cold processes each (seconds, wall)")
    for name, code in cases.items():
        times = cold(code, args.repeat)
        print(f"  {name:32s} min {min(times):.3f}  median {statistics.median(times):.3f}")


if __name__ == "__main__":
    main()
