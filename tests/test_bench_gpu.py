"""benchmarks/bench_gpu.py runs (at toy sizes, on the CPU) before a GPU is lent to measure with it:
every part prints its figures, and the end-to-end indexing counted every file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_runs_every_part(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMSEARCH_HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    images = re.search(r"end to end (\d+) \| decode alone (\d+) \| encoder alone (\d+)", out)
    assert images and all(int(x) > 0 for x in images.groups()), out
    assert "(16 files)" in out
    assert len(re.findall(r"exact .* ms vs floor .* q/s", out)) == 2, out
    recall = re.search(r"recall@10 (\d\.\d+)", out)
    assert recall and float(recall.group(1)) >= 0.9, out
    assert re.search(r"finetune samples/s \d+ vs bare open_clip step \d+", out), out
