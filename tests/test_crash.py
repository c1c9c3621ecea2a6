"""Crash harness (issue 8, item 12): SIGKILL indexing runs at random moments, then check the index.

Each cycle runs indexing in a subprocess, either the real CLI (`python -m mmsearch.cli index`) or a
small runner that calls `mmsearch.index_paths(IndexOptions(..., commit_every=4))` so commits are
frequent, and kills its process group with SIGKILL at a random moment (a random time after start,
or the moment a commit is under way). After every kill:

- the index opens and answers a search, or, killed before anything was committed, is absent or
  empty;
- no duplicates: each path once, each unit id once; the vectors hold exactly the catalog's unit
  ids, with the catalog's vectors; every unit has its file row;
- what is committed is a subset of a clean build (same segments, same vectors);
- during `--rebuild` from model A to model B: the index answers fully with A or fully with B.

A plain rerun to completion must then give exactly the clean build made at the start.

The runner is a fork server: it imports torch, open_clip and mmsearch once, then forks one child per
run (the child calls os.setsid, so killing its process group also kills its decode workers). A
fresh interpreter costs seconds of imports per kill; forking keeps the kills inside the indexing
work. The CLI cycles pay the full start-up, as a user's process does.

Reproduce a run with MMSEARCH_CRASH_SEED=<seed> (printed on failure; kill times still vary with
the machine's load). The slow test prints its figures; see them with `pytest -s` or `-rP`.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, make_note

from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, SearchOptions
from mmsearch.pipeline.run import index_paths

REPO = Path(__file__).resolve().parents[1]
NAME = "default"
TOL_FP32 = 1e-5
# Batches differ between a resumed run and a clean one; in bf16 (precision=auto on a CPU with
# native bf16, which the CLI cannot be told otherwise) that moves vectors by more than fp32 does.
TOL_BF16 = 2e-2


def _env() -> dict:
    env = dict(os.environ)
    # the worktree's mmsearch, not whatever the editable install points at
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # several processes share the cores
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _seed() -> int:
    return int(os.environ.get("MMSEARCH_CRASH_SEED") or random.SystemRandom().randrange(10**6))


# --- corpus and clean builds ------------------------------------------------------------------
def make_corpus(root: Path, n_images: int) -> Path:
    """Images in three folders, a byte-identical copy, notes of several chunks, a broken file."""
    for i in range(n_images):
        make_image(
            root / f"d{i % 3}" / f"img{i:03}.jpg", pattern=1000 + i, size=(40 + i % 4 * 8, 32)
        )
    shutil.copy(root / "d0" / "img000.jpg", root / "copy-of-img000.jpg")
    for j in range(3):
        words = " ".join(f"note{j} line{k} " + "word " * (10 + j * 7) for k in range(12))
        make_note(root / "notes" / f"n{j}.md", words.replace("word word ", "word\n"))
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


@dataclass
class Snapshot:
    """What an index holds, read from catalog.sqlite directly."""

    key: str | None  # encoder identity key from the manifest (None: no manifest or no encoder)
    files: dict[str, tuple[list[tuple], np.ndarray]]  # path -> (segments, vectors)
    failures: set[str]


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def read_manifest(index_dir: Path) -> dict | None:
    try:
        return json.loads((index_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def data_dir(index_dir: Path) -> Path:
    """The live generation's directory: the index directory, or the `gen-*` one a rebuild
    switched the manifest to."""
    return index_dir / ((read_manifest(index_dir) or {}).get("data") or ".")


def snapshot(index_dir: Path) -> Snapshot:
    manifest = read_manifest(index_dir) or {}
    key = (manifest.get("encoder") or {}).get("key")
    files, failures = {}, set()
    db = data_dir(index_dir) / "catalog.sqlite"
    if db.is_file():
        con = _connect(db)
        try:
            rows = con.execute(
                "SELECT f.path, u.start, u.end, u.vector FROM units u "
                "JOIN files f ON f.id = u.file_id ORDER BY u.id"
            ).fetchall()
            segs: dict[str, list] = {}
            vecs: dict[str, list] = {}
            for path, start, end, vec in rows:
                p = os.fsdecode(path)
                segs.setdefault(p, []).append((start, end))
                vecs.setdefault(p, []).append(np.frombuffer(vec, np.float32))
            files = {p: (segs[p], np.stack(vecs[p])) for p in segs}
            failures = {os.fsdecode(r[0]) for r in con.execute("SELECT path FROM failures")}
        finally:
            con.close()
    return Snapshot(key, files, failures)


def compare(got: Snapshot, want: Snapshot, tol: float, subset: bool = False) -> list[str]:
    """Differences between an index and a clean build (`subset`: got may lack whole files)."""
    problems = []
    if got.key != want.key:
        problems.append(f"encoder key {got.key} != clean build's {want.key}")
    missing = want.files.keys() - got.files.keys()
    extra = got.files.keys() - want.files.keys()
    if extra:
        problems.append(f"{len(extra)} paths not in the clean build, e.g. {sorted(extra)[:2]}")
    if missing and not subset:
        problems.append(
            f"{len(missing)} paths of the clean build missing, e.g. {sorted(missing)[:2]}"
        )
    for p in sorted(got.files.keys() & want.files.keys()):
        (gs, gv), (ws, wv) = got.files[p], want.files[p]
        if gs != ws:
            problems.append(f"{p}: segments {gs} != clean {ws}")
        elif not np.allclose(gv, wv, atol=tol, rtol=0):
            problems.append(f"{p}: vectors differ by {np.abs(gv - wv).max():.2e} (tol {tol})")
    if not subset and got.failures != want.failures:
        problems.append(f"failures {sorted(got.failures)} != clean {sorted(want.failures)}")
    return problems


def check_consistency(index_dir: Path, query: str = "a photo of a dog") -> list[str]:
    """The index opens and answers; no duplicates; vectors == the catalog's units, and back.

    An index killed before its first commit may be absent or empty (no files): that is fine."""
    from mmsearch.errors import MMSearchError
    from mmsearch.search import Searcher
    from mmsearch.storage.collection import Collection

    problems: list[str] = []
    manifest = read_manifest(index_dir)
    db = data_dir(index_dir) / "catalog.sqlite"
    try:
        n_files, units, meta = _catalog_facts(db, problems) if db.is_file() else (0, {}, {})
    except sqlite3.Error as e:
        return [f"catalog unreadable: {e}"]
    unit_ids = np.array(sorted(units), np.int64)
    if manifest is None or not manifest.get("encoder"):
        if n_files:
            problems.append(f"no manifest/encoder record but {n_files} files in the catalog")
        return problems  # absent or empty: nothing to search
    _check_vector_file(index_dir, manifest, meta, unit_ids, problems)
    try:
        with Collection.open_reader(index_dir.parent, index_dir.name) as col:
            _check_reader_vectors(col.vectors, units, problems)
        with Searcher(SearchOptions(name=index_dir.name, root_dir=index_dir.parent, k=5)) as s:
            hits = s.search(query)
        if len(hits) != min(5, len(unit_ids)):
            problems.append(f"search gave {len(hits)} hits for {len(unit_ids)} vectors")
        con = _connect(db)
        try:
            known = {r[0] for r in con.execute("SELECT path FROM files")}
        finally:
            con.close()
        if any(h.path not in known for h in hits):
            problems.append("a hit names a path that is not in the catalog")
    except MMSearchError as e:
        if n_files:
            problems.append(f"index with {n_files} files does not answer: {e}")
    except Exception as e:  # noqa: BLE001 - a traceback is itself the finding
        problems.append(f"reading the index raised {type(e).__name__}: {e}")
    return problems


def _catalog_facts(db: Path, problems: list[str]) -> tuple[int, dict[int, np.ndarray], dict]:
    """(file rows, {unit id: vector}, meta) read straight from SQLite; duplicate paths or unit ids,
    orphan units and files without units added to `problems`."""
    con = _connect(db)
    try:
        if not con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            return 0, {}, {}  # killed before its schema committed: nothing was ever stored
        n_files, n_paths = con.execute(
            "SELECT COUNT(*), COUNT(DISTINCT path) FROM files"
        ).fetchone()
        if n_files != n_paths:
            problems.append(f"duplicate paths: {n_files} file rows for {n_paths} paths")
        rows = con.execute("SELECT id, vector FROM units ORDER BY id").fetchall()
        if len({r[0] for r in rows}) != len(rows):
            problems.append("duplicate unit ids")
        orphans = con.execute(
            "SELECT COUNT(*) FROM units WHERE file_id NOT IN (SELECT id FROM files)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} units without a file row")
        empty = con.execute(
            "SELECT COUNT(*) FROM files WHERE id NOT IN (SELECT file_id FROM units)"
        ).fetchone()[0]
        if empty:
            problems.append(f"{empty} file rows without units")
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    finally:
        con.close()
    return n_files, {r[0]: np.frombuffer(r[1], np.float32) for r in rows}, meta


def _check_vector_file(
    index_dir: Path, manifest: dict, meta: dict, unit_ids: np.ndarray, problems: list[str]
) -> None:
    """The vectors.faiss on disk, when the manifest says it reflects the catalog: the same ids."""
    import faiss

    vec_file = data_dir(index_dir) / "vectors.faiss"
    gen = manifest.get("vectors_generation")
    if not (vec_file.is_file() and gen is not None and str(gen) == str(meta.get("generation", 0))):
        return
    try:
        on_disk = faiss.read_index(str(vec_file))  # kept alive: id_map is a view into it
        ids = faiss.vector_to_array(on_disk.id_map)
        if sorted(ids.tolist()) != unit_ids.tolist():
            problems.append(
                f"vectors.faiss is stamped current but holds {len(ids)} ids "
                f"for {len(unit_ids)} catalog units"
            )
    except (RuntimeError, AttributeError) as e:
        problems.append(f"vectors.faiss stamped current but unreadable: {e}")


def _check_reader_vectors(vi, units: dict[int, np.ndarray], problems: list[str]) -> None:
    """The vectors a reader gets (the file, or rebuilt from the catalog): one per catalog unit,
    no duplicates, each equal to its catalog row."""
    import faiss

    index = vi.index
    if not hasattr(index, "id_map"):
        if vi.ntotal != len(units):
            problems.append(f"vector index holds {vi.ntotal} vectors for {len(units)} units")
        return
    ids = faiss.vector_to_array(index.id_map)
    vecs = index.index.reconstruct_n(0, index.ntotal) if index.ntotal else ids[:0]
    if len(set(ids.tolist())) != len(ids):
        problems.append("duplicate ids in the vector index")
    if sorted(ids.tolist()) != sorted(units):
        extra = set(ids.tolist()) - set(units)
        problems.append(
            f"vector index holds {len(ids)} ids, catalog {len(units)} units "
            f"({len(extra)} vectors without a catalog row)"
        )
        return
    for i, v in zip(ids.tolist(), vecs, strict=True):
        if not np.allclose(v, units[i], atol=1e-6):
            problems.append(f"vector {i} differs from its catalog row")
            break


@dataclass
class Clean:
    corpus: Path
    a: Path  # model directories
    b: Path
    snap_a: Snapshot
    snap_b: Snapshot
    tol: float


def _build(corpus: Path, root: Path, model: Path, rebuild: bool = False) -> None:
    index_paths(
        IndexOptions(
            roots=(corpus,),
            root_dir=root,
            encoder=EncoderOptions(model=ModelSpec.parse(str(model))),  # precision auto, as the CLI
            workers=0,
            rebuild=rebuild,
        )
    )


@pytest.fixture(scope="session")
def clean(tmp_path_factory, tiny_model, other_model) -> Clean:
    """One corpus and its clean builds with model A (tiny_model) and model B (other_model)."""
    from mmsearch.encoders.clip import cpu_has_native_bf16

    base = tmp_path_factory.mktemp("crash")
    corpus = make_corpus(base / "corpus", n_images=48)
    root = base / "clean"
    _build(corpus, root / "a", tiny_model)
    _build(corpus, root / "b", other_model)
    snap_a, snap_b = snapshot(root / "a" / NAME), snapshot(root / "b" / NAME)
    assert snap_a.files and snap_a.key != snap_b.key
    tol = TOL_BF16 if cpu_has_native_bf16() else TOL_FP32
    return Clean(corpus, tiny_model, other_model, snap_a, snap_b, tol)


# --- running and killing ----------------------------------------------------------------------
RUNNER = r"""
import json, os, sys, time, traceback
from contextlib import contextmanager
from pathlib import Path
import torch, open_clip, faiss  # noqa: F401  imported once, before any fork
from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec
from mmsearch.pipeline.run import index_paths
from mmsearch.storage import catalog as store

def mark(word):
    os.write(1, (word + "\n").encode())

pause = 0.0
_transaction = getattr(store.Catalog, "transaction", None)
if _transaction is not None:
    @contextmanager
    def transaction(self):
        with _transaction(self):
            yield
            mark("commit")  # the chunk's rows are written, COMMIT not yet issued
            if pause:
                time.sleep(pause)
    store.Catalog.transaction = transaction

mark("ready")
while True:
    line = sys.stdin.readline()
    if not line:
        break
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        pause = job["pause"]
        code = 0
        try:
            index_paths(IndexOptions(
                roots=(Path(job["corpus"]),), root_dir=Path(job["root"]),
                encoder=EncoderOptions(model=ModelSpec.parse(job["model"])),
                workers=job["workers"], commit_every=4, rebuild=job["rebuild"]))
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    mark(f"pid {pid}")
    _, status = os.waitpid(pid, 0)
    mark(f"exit {status}")
"""


@dataclass
class Outcome:
    killed: bool
    seconds: float  # from start to the kill or the exit
    commits: int  # commit marks seen (runner only)
    error: str | None = None  # the run failed on its own (exit status, log tail)
    lock_at: float | None = None  # when the CLI run was seen holding the writer lock


@dataclass
class Harness:
    clean: Clean
    base: Path
    seed: int
    rng: random.Random = field(init=False)
    log: list[str] = field(default_factory=list)
    kills: int = 0
    completed: int = 0
    inconsistencies: int = 0
    problems: list[str] = field(default_factory=list)
    tally: dict[str, list[int]] = field(default_factory=dict)  # chain kind -> [kills, bad]
    cli_after_lock: bool | None = None  # None: CLI kills pick either way at random
    _runner: subprocess.Popen | None = None
    _lines: queue.Queue | None = None

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    # the CLI ---------------------------------------------------------------------------------
    def cli(
        self, root: Path, model: Path, workers: int, rebuild=False, kill_at=None, after_lock=False
    ) -> Outcome:
        """One CLI run, killed `kill_at` seconds after it starts or (`after_lock`) after it
        takes the index's writer lock: its start-up imports are uneventful, what follows is not."""
        cmd = [sys.executable, "-m", "mmsearch.cli", "index", str(self.clean.corpus)]
        cmd += ["--model", str(model), "--index-dir", str(root), "--workers", str(workers)]
        cmd += ["--rebuild"] if rebuild else []
        logf = self.base / "cli.log"
        with open(logf, "wb") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
            )
            lock = root / NAME / "lock"
            while after_lock and proc.poll() is None and not _holds(lock, proc.pid):
                time.sleep(0.01)
            locked = time.perf_counter() - start
            try:
                proc.wait(timeout=kill_at if kill_at is not None else 600)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid)
                proc.wait()
            seconds = time.perf_counter() - start
        if proc.returncode == -signal.SIGKILL:
            return Outcome(True, seconds, 0, lock_at=locked if after_lock else None)
        err = None if proc.returncode == 0 else f"exit {proc.returncode}: {_tail(logf)}"
        return Outcome(False, seconds, 0, err, lock_at=locked if after_lock else None)

    def cli_search(self, root: Path) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "mmsearch.cli", "search", "a red square", "--json", "-k", "3",
             "--index-dir", str(root)],
            capture_output=True, text=True, env=_env(), timeout=300,
        )  # fmt: skip
        rows = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
        if out.returncode != 0 or len(rows) != 3:
            return [f"CLI search: exit {out.returncode}, {len(rows)} rows: {out.stderr[-300:]}"]
        return []

    # the runner (fork server) ----------------------------------------------------------------
    def _start_runner(self) -> None:
        logf = open(self.base / "runner.log", "wb")  # noqa: SIM115 - lives as long as the runner
        self._runner = subprocess.Popen(
            [sys.executable, "-c", RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=logf,
            env=_env(),
            start_new_session=True,
        )
        self._lines = queue.Queue()

        def pump(stream, q):
            for raw in iter(stream.readline, b""):
                q.put(raw.decode().strip())
            q.put(None)

        threading.Thread(target=pump, args=(self._runner.stdout, self._lines), daemon=True).start()
        assert self._next(300) == "ready", _tail(self.base / "runner.log")

    def _next(self, timeout: float) -> str | None:
        line = self._lines.get(timeout=timeout)
        if line is None:
            raise RuntimeError(f"runner died: {_tail(self.base / 'runner.log')}")
        return line

    def close(self) -> None:
        if self._runner is not None:  # idle between runs: nothing to lose, no slow teardown
            _killpg(self._runner.pid)
            self._runner.wait()
            self._runner.stdin.close()
            self._runner.stdout.close()
            self._runner = None

    def runner(
        self, root: Path, model: Path, workers: int, rebuild=False, kill_at=None,
        kill_at_commit=None, delay=0.0, pause=0.0,
    ) -> Outcome:  # fmt: skip
        """One run in a forked child; killed `kill_at` seconds after it starts, or `delay`
        seconds after the `kill_at_commit`-th commit is written (the commit waits `pause`)."""
        if self._runner is None:
            self._start_runner()
        job = dict(corpus=str(self.clean.corpus), root=str(root), model=str(model),
                   workers=workers, rebuild=rebuild, pause=pause)  # fmt: skip
        log_size = (self.base / "runner.log").stat().st_size
        self._runner.stdin.write((json.dumps(job) + "\n").encode())
        self._runner.stdin.flush()
        line = self._next(300)
        assert line.startswith("pid "), line
        pid = int(line.split()[1])
        start = time.perf_counter()
        commits, killed = 0, False
        deadline = start + (kill_at if kill_at is not None else 600)
        while True:
            try:
                line = self._next(max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                line = None
            if line is None:  # the deadline passed
                if killed:
                    raise RuntimeError(f"run {pid} was killed but never reported its exit")
                _killpg(pid)
                killed, deadline = True, time.perf_counter() + 120
                continue
            if line == "commit":
                commits += 1
                if kill_at_commit is not None and commits == kill_at_commit and not killed:
                    if delay:
                        time.sleep(delay)
                    _killpg(pid)
                    killed, deadline = True, time.perf_counter() + 120
            elif line and line.startswith("exit "):
                status = int(line.split()[1])
                seconds = time.perf_counter() - start
                break
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            return Outcome(True, seconds, commits)
        err = None
        if status != 0:
            with open(self.base / "runner.log", "rb") as f:
                f.seek(log_size)
                err = f"status {status}: {f.read().decode(errors='replace')[-1500:]}"
        return Outcome(False, seconds, commits, err)

    # bookkeeping -----------------------------------------------------------------------------
    def record(self, what: str, outcome: Outcome, problems: list[str]) -> None:
        tally = self.tally.setdefault("--rebuild" if what.startswith("rb") else "plain", [0, 0])
        if outcome.killed:
            self.kills += 1
            tally[0] += 1
        else:
            self.completed += 1
        tally[1] += bool(problems or outcome.error)
        state = "killed" if outcome.killed else "completed"
        line = f"{what}: {state} at {outcome.seconds:.2f}s"
        line += f" (lock taken at {outcome.lock_at:.2f}s)" if outcome.lock_at is not None else ""
        line += f" after {outcome.commits} commits" if outcome.commits else ""
        if outcome.error:
            problems = [f"run failed: {outcome.error}", *problems]
        if problems:
            self.inconsistencies += 1
            line += " -> " + "; ".join(problems)
            self.problems.append(line)
        self.log.append(line)

    def verdict(self, what: str, problems: list[str]) -> None:
        """A comparison that is not a run (the final state against the clean build)."""
        tally = self.tally.setdefault("--rebuild" if what.startswith("rb") else "plain", [0, 0])
        tally[1] += bool(problems)
        self.inconsistencies += bool(problems)
        line = f"{what}: " + ("; ".join(problems) if problems else "equal")
        if problems:
            self.problems.append(line)
        self.log.append(line)

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {v[0]} kills, {v[1]} inconsistent" for k, v in self.tally.items())
        return (
            f"seed {self.seed}: {self.kills} kills, {self.completed} runs completed, "
            f"{self.inconsistencies} inconsistencies ({parts})"
        )

    def report(self) -> str:
        return "\n".join([self.summary(), *self.log])


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the run and its decode workers
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _holds(lock: Path, pid: int) -> bool:
    try:
        return lock.read_text().strip() == str(pid)
    except OSError:
        return False


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


# --- scenarios --------------------------------------------------------------------------------
def plain_chain(h: Harness, tag: str, kind: str, kills: int, workers: int, est: float) -> None:
    """Index an empty index, killing it `kills` times (a run that finishes first ends the chain),
    checking after each kill; then finish it and compare with the clean build."""
    c = h.clean
    root = h.base / tag
    index_dir = root / NAME
    total = len(c.snap_a.files)
    for _ in range(kills):
        left = 1 - len(snapshot(index_dir).files) / total
        if kind == "cli":
            at, after_lock = _cli_kill(h, est)
            what = f"{tag} cli workers={workers} kill at {at}s" + (" after lock" * after_lock)
            out = h.cli(root, c.a, workers, kill_at=at, after_lock=after_lock)
        elif h.rng.random() < 0.5:
            at = round(h.rng.uniform(0.1, max(0.3, est * left)), 3)
            what = f"{tag} runner workers={workers} kill at {at}s"
            out = h.runner(root, c.a, workers, kill_at=at)
        else:
            n, pause = _commit_kill(h, est_commits(c, left))
            delay = round(h.rng.uniform(0, pause or 0.003), 4)
            what = f"{tag} runner workers={workers} kill at commit {n} +{delay}s (pause {pause})"
            out = h.runner(root, c.a, workers, kill_at_commit=n, delay=delay, pause=pause)
        problems = check_consistency(index_dir)
        problems += (
            compare(snapshot(index_dir), c.snap_a, c.tol, subset=True)
            if _has_key(index_dir)
            else []
        )
        h.record(what, out, problems)
        if not out.killed:
            break
    else:
        run = h.cli if kind == "cli" else h.runner
        out = run(root, c.a, workers)
        h.record(f"{tag} {kind} rerun to completion", out, check_consistency(index_dir))
    problems = compare(snapshot(index_dir), c.snap_a, c.tol)
    if kind == "cli":
        problems += h.cli_search(root)
    h.verdict(f"{tag} final state vs clean build", problems)


def rebuild_chain(h: Harness, tag: str, kind: str, kills: int, workers: int, est: float) -> None:
    """An index complete with model A, `--rebuild --model B` killed `kills` times: after each kill
    the index answers fully with A (the old generation) or fully with B; then the rebuild is run
    to completion and must equal the clean build with B."""
    c = h.clean
    root = h.base / tag
    index_dir = root / NAME
    _build(c.corpus, root, c.a)
    for _ in range(kills):
        if kind == "cli":
            at, after_lock = _cli_kill(h, est)
            what = f"{tag} cli --rebuild workers={workers} kill at {at}s" + (
                " after lock" * after_lock
            )
            out = h.cli(root, c.b, workers, rebuild=True, kill_at=at, after_lock=after_lock)
        elif h.rng.random() < 0.4:
            at = round(h.rng.uniform(0.1, est), 3)
            what = f"{tag} runner --rebuild workers={workers} kill at {at}s"
            out = h.runner(root, c.b, workers, rebuild=True, kill_at=at)
        else:
            n, pause = _commit_kill(h, est_commits(c, 1.0))
            delay = round(h.rng.uniform(0, pause or 0.003), 4)
            what = f"{tag} runner --rebuild workers={workers} kill at commit {n} +{delay}s"
            out = h.runner(root, c.b, workers, rebuild=True, kill_at_commit=n, delay=delay,
                           pause=pause)  # fmt: skip
        problems = check_consistency(index_dir) + rebuild_state(index_dir, c)
        h.record(what, out, problems)
        if not out.killed:
            break
    else:
        run = h.cli if kind == "cli" else h.runner
        out = run(root, c.b, workers, rebuild=True)
        h.record(f"{tag} {kind} --rebuild to completion", out, check_consistency(index_dir))
    h.verdict(f"{tag} final state vs clean build B", compare(snapshot(index_dir), c.snap_b, c.tol))


def rebuild_state(index_dir: Path, c: Clean) -> list[str]:
    """Fully model A or fully model B; never a mix, never empty."""
    snap = snapshot(index_dir)
    if snap.key == c.snap_a.key:
        problems = compare(snap, c.snap_a, c.tol)
        which = "A"
    elif snap.key == c.snap_b.key:
        problems = compare(snap, c.snap_b, c.tol)
        which = "B"
    else:
        return [f"after a killed rebuild the index names no known model (key {snap.key}, "
                f"{len(snap.files)} files)"]  # fmt: skip
    if problems:
        return [f"killed rebuild left model {which} with {len(snap.files)} of "
                f"{len(c.snap_a.files)} files: {problems[0]}"]  # fmt: skip
    return []


def _cli_kill(h: Harness, est: tuple[float, float]) -> tuple[float, bool]:
    """Half the CLI kills at a uniform time over the whole run, half over what follows the
    writer lock (model load, embedding, commits); `est` = (whole run, after the lock) seconds."""
    whole, after = est
    after_lock = h.rng.random() >= 0.5 if h.cli_after_lock is None else h.cli_after_lock
    if not after_lock:
        return round(h.rng.uniform(0.1, whole), 3), False
    return round(h.rng.uniform(0.0, after), 3), True


def est_commits(c: Clean, left: float) -> int:
    return max(1, int((len(c.snap_a.files) + len(c.snap_a.failures)) / 4 * left))


def _commit_kill(h: Harness, commits: int) -> tuple[int, float]:
    """Which commit to kill at, and whether that commit pauses (so the kill lands while the
    transaction is open) or not (so it lands in SQLite's COMMIT, the vector update or after)."""
    return h.rng.randint(1, commits), h.rng.choice([0.0, 0.05])


def _has_key(index_dir: Path) -> bool:
    return bool((read_manifest(index_dir) or {}).get("encoder"))


@pytest.fixture
def harness(clean, tmp_path):
    h = Harness(clean, tmp_path, _seed())
    yield h
    h.close()


def _assert_clean(h: Harness) -> None:
    print("\n" + h.report())
    assert h.inconsistencies == 0, "\n".join([h.summary(), *h.problems, "", h.report()])


# --- tests ------------------------------------------------------------------------------------
def test_killed_runs_leave_a_consistent_index_that_resumes(harness):
    """Quick: a CLI run killed once, a runner killed during a commit and at a random time."""
    h = harness
    h.cli_after_lock = True  # start-up alone tests nothing
    plain_chain(h, "cli", "cli", kills=1, workers=0, est=(8.0, 3.0))
    h.rng = random.Random(h.seed + 1)
    root = h.base / "runner"
    out = h.runner(root, h.clean.a, 0, kill_at_commit=2, pause=0.05, delay=0.01)
    h.record("runner kill inside commit 2", out, check_consistency(root / NAME))
    plain_chain(h, "runner", "runner", kills=2, workers=1, est=3.0)
    _assert_clean(h)
    assert h.kills >= 2


def test_killed_rebuild_keeps_the_old_model_or_completes(harness):
    """Quick: `--rebuild` to another model killed at its second commit."""
    h = harness
    c = h.clean
    root = h.base / "rb"
    _build(c.corpus, root, c.a)
    out = h.runner(root, c.b, 0, rebuild=True, kill_at_commit=2, pause=0.05, delay=0.01)
    h.record("rb runner --rebuild kill inside commit 2", out,
             check_consistency(root / NAME) + rebuild_state(root / NAME, c))  # fmt: skip
    out = h.runner(root, c.b, 0, rebuild=True)
    h.record(
        "rb runner --rebuild to completion", out, compare(snapshot(root / NAME), c.snap_b, c.tol)
    )
    _assert_clean(h)


@pytest.mark.slow
def test_crash_harness_many_kill_points(harness):
    """At least 50 kill points: CLI and runner, workers 0 and 1, plain and --rebuild chains."""
    h = harness
    c = h.clean
    # Timing: one uninterrupted run of each kind, so kill times span a whole run.
    out = h.cli(h.base / "t-cli", c.a, 0, after_lock=True)
    est_cli = (out.seconds, out.seconds - out.lock_at)
    h.record(
        "t-cli uninterrupted", out, compare(snapshot(h.base / "t-cli" / NAME), c.snap_a, c.tol)
    )
    h._start_runner()
    out = h.runner(h.base / "t-run", c.a, 0)
    est_run = out.seconds
    h.record(
        "t-run uninterrupted", out, compare(snapshot(h.base / "t-run" / NAME), c.snap_a, c.tol)
    )
    print(f"\nuninterrupted: CLI {est_cli[0]:.1f}s ({est_cli[1]:.1f}s after the lock), "
          f"runner child {est_run:.1f}s")  # fmt: skip
    for i in range(2):
        plain_chain(h, f"cli{i}", "cli", kills=4, workers=i, est=est_cli)
    rebuild_chain(h, "rb-cli", "cli", kills=3, workers=1, est=est_cli)
    i = 0
    while h.kills < 44:
        plain_chain(h, f"run{i}", "runner", kills=6, workers=i % 2, est=est_run)
        i += 1
    for i in range(2):
        rebuild_chain(h, f"rb-run{i}", "runner", kills=4, workers=i % 2, est=est_run)
    while h.kills < 50:
        plain_chain(h, f"run{i}", "runner", kills=6, workers=i % 2, est=est_run)
        i += 1
    _assert_clean(h)
