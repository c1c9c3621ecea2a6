"""Indexing on Ray (a local Ray instance here): the same index as a local run, incrementally."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import bump_mtime, make_image, make_note

from mmsearch.config import (
    EncoderOptions,
    IndexOptions,
    ModelSpec,
    RaySettings,
    SearchOptions,
    index_root,
)
from mmsearch.pipeline.run import index_paths
from mmsearch.search import Searcher
from mmsearch.storage.collection import Collection

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a Ray instance takes ~10-40 s to start on 2 cores


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(
        address="local",  # a new instance, never another process's cluster
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024**2,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


def run(tiny_model, root, name, on_ray: bool):
    return index_paths(
        IndexOptions(
            roots=(Path(root),),
            name=name,
            root_dir=index_root(),
            encoder=EncoderOptions(model=ModelSpec.parse(str(tiny_model)), precision="fp32"),
            workers=0,
            commit_every=3,  # several committed chunks from the cluster
            ray=RaySettings(address="local", actors=1, files_per_batch=2) if on_ray else None,
        )
    )


def contents(name: str) -> dict:
    with Collection.open_reader(index_root(), name) as col:
        files = col.catalog.files_under([b"/"])
        out = {}
        for path, row in files.items():
            units = col.catalog.units_of(row.id)
            out[os.fsdecode(path)] = (
                row.hash,
                [(s.start, s.end) for s, _ in units],
                np.stack([v for _, v in units]),
            )
        failures = {os.fsdecode(p): reason for p, reason, _ in col.catalog.failures()}
        return {"files": out, "failures": failures}


def test_ray_run_builds_the_same_index_as_a_local_run(tiny_model, media, monkeypatch):
    import mmsearch.pipeline.commit

    make_note(media / "notes" / "long.txt", "\n".join(f"line {i} about boats" for i in range(60)))
    local = run(tiny_model, media, "local", on_ray=False)

    def no_local_decoding(*a, **k):
        raise AssertionError("a Ray run decoded files on the driver")

    with monkeypatch.context() as m:
        m.setattr(mmsearch.pipeline.commit, "load_chunks", no_local_decoding)
        remote = run(tiny_model, media, "remote", on_ray=True)
    fields = ("added", "updated", "removed", "moved", "unchanged", "failed", "files", "vectors")
    assert [getattr(remote, f) for f in fields] == [getattr(local, f) for f in fields]
    assert remote.failures == local.failures and remote.failed == 1

    a, b = contents("local"), contents("remote")
    assert a["failures"] == b["failures"]
    assert set(a["files"]) == set(b["files"])
    for path, (digest, segments, vecs) in a["files"].items():
        digest2, segments2, vecs2 = b["files"][path]
        assert (digest2, segments2) == (digest, segments), path
        assert np.abs(vecs - vecs2).max() < 1e-5, path
    long_note = a["files"][str(media / "notes" / "long.txt")]
    assert len(long_note[1]) > 1  # chunked into line ranges, carried back from the workers

    queries = ["a dog on the beach", "boats"]
    for name in ("local", "remote"):
        with Searcher(SearchOptions(name=name, k=10)) as s:
            hits = [[h.path for h in s.search(q)] for q in queries]
        if name == "local":
            expected = hits
    assert hits == expected


def test_ray_runs_are_incremental(tiny_model, media, monkeypatch):
    import mmsearch.pipeline.ray

    run(tiny_model, media, "remote", on_ray=True)
    make_image(media / "photos" / "new.png", pattern=77)
    changed = media / "photos" / "p1.jpg"
    make_image(changed, pattern=78, size=(72, 48))
    bump_mtime(changed)
    bump_mtime(media / "photos" / "p0.jpg")  # touched, same content
    (media / "photos" / "p2.jpg").unlink()
    (media / "photos" / "p3.jpg").rename(media / "photos" / "moved.jpg")

    embedded_remotely = set()
    real = mmsearch.pipeline.ray.ray_chunks

    def spy(*a, **k):
        for loaded, results in real(*a, **k):
            embedded_remotely.update(os.fsdecode(p) for p in results)
            yield loaded, results

    with monkeypatch.context() as m:
        m.setattr(mmsearch.pipeline.ray, "ray_chunks", spy)
        r = run(tiny_model, media, "remote", on_ray=True)
    assert (r.added, r.updated, r.removed, r.moved, r.unchanged) == (1, 1, 1, 1, 3)
    assert r.failed == 1 and r.failed_now == 0
    # the cluster embedded only new content: the touched and the moved file were only hashed
    assert embedded_remotely == {str(media / "photos" / "new.png"), str(changed)}

    # the same changes replayed locally on a copy give the same index
    again = run(tiny_model, media, "local", on_ray=False)
    assert again.files == r.files and again.vectors == r.vectors
    a, b = contents("local"), contents("remote")
    assert {p: v[0] for p, v in a["files"].items()} == {p: v[0] for p, v in b["files"].items()}


def test_cli_index_on_ray_and_its_errors(tiny_model, media):
    import json

    from typer.testing import CliRunner

    from mmsearch.cli import app

    runner = CliRunner()
    args = ["index", str(media), "--model", str(tiny_model), "--json"]
    r = runner.invoke(app, [*args, "--ray", "local", "--ray-actors", "1"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert (report["added"], report["failed"], report["files"]) == (6, 1, 6)

    r = runner.invoke(app, [*args, "--ray-actors", "2"])
    assert r.exit_code == 2 and "--ray-actors goes with --ray" in r.output
