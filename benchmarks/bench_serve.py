"""Warm search through `mmsearch serve` vs the same query inside one process vs a cold CLI.

    python benchmarks/bench_serve.py [--items 10000] [--queries 200] [--clients 8]
    python benchmarks/bench_serve.py --items 1000000   # the IVF row (~15 min to build here)
    python benchmarks/bench_serve.py --work /tmp/serve10k  # keeps the index for the next run

One index (ViT-B-32, random weights; 20 real photos padded to --items vectors, see
common.padded_index). Measured side by side in one run:
- text queries (flickr8k captions), one after another: p50/p95 of GET /api/search through the
  real `mmsearch serve` (HTTP on loopback, one kept-alive connection) vs Searcher.search in this
  process (as it is, and with faiss on one OpenMP thread, as the server's request threads search)
  vs a cold `mmsearch search` process; the HTTP floor is GET /api/info; the bound no search can
  beat is the query's text embedding alone (Searcher.embed_texts);
- image queries: an uploaded JPEG (POST /api/search) vs Searcher.search(image=...);
- throughput with --clients concurrent clients, with the server batching texts that arrive
  together and without (the same app with ServeOptions(batch=False)).
The API's hits are checked against the in-process ones (same paths, same order).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

from common import DATASETS, machine, padded_index, require_datasets

# The same app and uvicorn settings as `mmsearch serve`, with batching off.
SERVE_WITHOUT_BATCHING = """
import socket, sys, uvicorn
from pathlib import Path
from mmsearch.serve import ServeOptions, create_app
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(128)
app = create_app(ServeOptions(root_dir=Path(sys.argv[1]), batch=False))
print(f"serving at http://127.0.0.1:{sock.getsockname()[1]}/ ", flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")).run(sockets=[sock])
"""


class Client:
    """One kept-alive HTTP connection."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)

    def _send(self, method: str, path: str, body=None, headers=None) -> tuple[float, dict]:
        start = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = json.loads(response.read())
        took = time.perf_counter() - start
        if response.status != 200:
            raise SystemExit(f"{method} {path}: {response.status} {data}")
        return took, data

    def search(self, text: str) -> tuple[float, dict]:
        return self._send("GET", f"/api/search?q={quote(text)}&k=10")

    def info(self) -> float:
        return self._send("GET", "/api/info")[0]

    def upload(self, photo: Path) -> tuple[float, dict]:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{photo.name}"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode()
            + photo.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self._send("POST", "/api/search?k=10", body, headers)


class Server:
    """A server process; its address is read from the line it prints when it listens."""

    def __init__(self, cmd: list[str], env: dict):
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.proc.kill()
            raise SystemExit(f"server did not start: {line!r}")
        self.url = next(w for w in line.split() if w.startswith("http://"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def quantiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p95 in ms."""
    cuts = statistics.quantiles(seconds, n=20, method="inclusive")
    return 1000 * statistics.median(seconds), 1000 * cuts[18]


def throughput(url: str, queries: list[str], clients: int) -> tuple[float, float, float]:
    """Queries/s with `clients` concurrent clients, and their p50/p95 in ms."""
    shares = [queries[i::clients] for i in range(clients)]
    latencies: list[float] = []
    start = threading.Barrier(clients + 1)

    def run(share):
        client = Client(url)
        client.search(share[0])  # connected before the clock starts
        start.wait()
        latencies.extend(client.search(q)[0] for q in share)

    threads = [threading.Thread(target=run, args=(share,)) for share in shares]
    for t in threads:
        t.start()
    start.wait()
    begun = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begun
    return len(queries) / wall, *quantiles(latencies)


def captions(n: int) -> list[str]:
    with open(DATASETS / "flickr8k_val1k" / "manifest.csv", newline="") as f:
        texts = list(dict.fromkeys(row["text"].strip() for row in csv.DictReader(f)))
    return texts[:n]


def timed(fn, *args, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kw)
    return time.perf_counter() - start, result


def in_process(root: Path, texts: list[str], photos: list[Path]) -> dict:
    import faiss

    from mmsearch.config import SearchOptions
    from mmsearch.search import Searcher

    with Searcher(SearchOptions(root_dir=root)) as s:
        s.search(texts[0])
        # faiss's default threads and one thread (as the server's request threads search),
        # interleaved query by query in alternating order: run one after the other, the second
        # read faster for being second.
        threads = faiss.omp_get_max_threads()
        runs, one = [], []
        for i, q in enumerate(texts):
            for default in (True, False) if i % 2 else (False, True):
                faiss.omp_set_num_threads(threads if default else 1)
                took, hits = timed(s.search, q)
                if default:
                    runs.append((took, hits))
                else:
                    one.append(took)
        faiss.omp_set_num_threads(threads)
        tower = [timed(s.embed_texts, [q])[0] for q in texts]  # the bound: the query's embedding
        s.search(image=photos[0])  # the image tower loads
        images = [timed(lambda p: s.search(image=p), p)[0] for p in photos]
    paths = {
        q: [os.fsdecode(h.path) for h in hits] for q, (_, hits) in zip(texts, runs, strict=True)
    }
    return {
        "text": [t for t, _ in runs],
        "tower": tower,
        "one": one,
        "image": images,
        "paths": paths,
    }


def through_api(env: dict, texts: list[str], photos: list[Path], clients: int) -> dict:
    server = Server([sys.executable, "-m", "mmsearch.cli", "serve", "--port", "0"], env)
    try:
        client = Client(server.url)
        for q in texts[:5]:
            client.search(q)
        out = {"floor": [client.info() for _ in texts]}
        runs = [client.search(q) for q in texts]
        out["text"] = [t for t, _ in runs]
        out["paths"] = {
            q: [h["path"] for h in d["hits"]] for q, (_, d) in zip(texts, runs, strict=True)
        }
        client.upload(photos[0])
        out["image"] = [client.upload(p)[0] for p in photos]
        out["batched"] = throughput(server.url, texts, clients)
    finally:
        server.stop()
    server = Server([sys.executable, "-c", SERVE_WITHOUT_BATCHING, env["MMSEARCH_HOME"]], env)
    try:
        out["unbatched"] = throughput(server.url, texts, clients)
    finally:
        server.stop()
    return out


def cold_cli(env: dict, text: str, runs: int) -> list[float]:
    cmd = [sys.executable, "-m", "mmsearch.cli", "search", text, "-k", "10"]
    subprocess.run(cmd, env=env, capture_output=True, check=True)  # page cache warm
    return [
        timed(subprocess.run, cmd, env=env, capture_output=True, check=True)[0] for _ in range(runs)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--cold-runs", type=int, default=5)
    ap.add_argument(
        "--work", type=Path, help="build the index here and keep it; reused by a later run"
    )
    args = ap.parse_args()
    require_datasets()

    work = args.work or Path(tempfile.mkdtemp(prefix="mmserve-"))
    built = work / f"built-{args.items}"  # written once the padded index is complete
    if built.is_file():
        root = Path(built.read_text())
    else:
        root = padded_index(work, args.items)
        if args.work:
            built.write_text(str(root))
    texts = captions(args.queries)
    photos = sorted((DATASETS / "flickr8k_val1k" / "images").glob("*.jpg"))[-args.images :]
    env = {**os.environ, "MMSEARCH_HOME": str(root)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as a user's installed package: bytecode cached
    local = in_process(root, texts, photos)
    api = through_api(env, texts, photos, args.clients)
    cold_s = cold_cli(env, texts[0], args.cold_runs)
    if not args.work:
        shutil.rmtree(work)

    same = sum(api["paths"][q] == local["paths"][q] for q in texts)
    a, i, h = quantiles(api["text"]), quantiles(local["text"]), quantiles(api["floor"])
    one, tower = quantiles(local["one"]), quantiles(local["tower"])
    ai, li = quantiles(api["image"]), quantiles(local["image"])
    cold = 1000 * statistics.median(cold_s)
    print(f"machine: {machine()}, load {os.getloadavg()[0]:.1f}")
    print(f"index: {args.items} vectors (ViT-B-32, random weights); {len(texts)} text queries")
    print(f"text tower alone (the bound)    p50 {tower[0]:7.1f} ms  p95 {tower[1]:7.1f} ms")
    print(f"in-process Searcher.search      p50 {i[0]:7.1f} ms  p95 {i[1]:7.1f} ms")
    print(f"  ... with one faiss thread     p50 {one[0]:7.1f} ms  p95 {one[1]:7.1f} ms")
    print(f"API GET /api/search             p50 {a[0]:7.1f} ms  p95 {a[1]:7.1f} ms")
    print(f"HTTP floor GET /api/info        p50 {h[0]:7.1f} ms  p95 {h[1]:7.1f} ms")
    print(f"cold `mmsearch search`          p50 {cold:7.1f} ms  ({args.cold_runs} runs)")
    print(f"API hits equal to in-process:   {same}/{len(texts)}")
    print(f"image query, in-process         p50 {li[0]:7.1f} ms  p95 {li[1]:7.1f} ms")
    print(f"image query, uploaded JPEG      p50 {ai[0]:7.1f} ms  p95 {ai[1]:7.1f} ms")
    for name in ("batched", "unbatched"):
        qps, p50, p95 = api[name]
        print(f"{args.clients} clients, {name:<9}           {qps:6.1f} q/s   p50 {p50:7.1f} ms  "
              f"p95 {p95:7.1f} ms")  # fmt: skip
    print(f"ratio API/in-process p50: {a[0] / i[0]:.2f}; to in-process with one faiss thread, "
          f"as the server: {a[0] / one[0]:.2f} (target <= 1.3)")  # fmt: skip
    print(f"ratio API/text tower alone p50: {a[0] / tower[0]:.2f}")
    print(f"ratio cold CLI/API p50: {cold / a[0]:.1f}x (target >= 10x)")
    print(f"ratio throughput batched/unbatched: {api['batched'][0] / api['unbatched'][0]:.2f}")


if __name__ == "__main__":
    main()
