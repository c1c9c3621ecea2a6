"""Incremental indexing as users rely on it: what is added, updated, moved, removed, skipped."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import bump_mtime, make_image, make_note

from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec, SearchOptions, index_root
from mmsearch.errors import IndexLockedError, ModelMismatchError, UsageError
from mmsearch.pipeline.run import index_paths
from mmsearch.search import Searcher
from mmsearch.storage.collection import Collection


def run(tiny_model, *roots, progress=None, **kw):
    opts = IndexOptions(
        roots=tuple(Path(r) for r in roots),
        root_dir=index_root(),
        encoder=EncoderOptions(model=ModelSpec.parse(str(tiny_model)), precision="fp32"),
        workers=kw.pop("workers", 0),
        **kw,
    )
    return index_paths(opts, progress)


def paths_in_index(name="default") -> set[str]:
    with Collection.open_reader(index_root(), name) as col:
        return {os.fsdecode(p) for p in col.catalog.files_under([b"/"])}


def test_first_run_counts_and_failures(tiny_model, media):
    r = run(tiny_model, media)
    assert (r.added, r.updated, r.removed, r.moved, r.unchanged) == (6, 0, 0, 0, 0)
    assert r.failed == 1 and r.files == 6
    assert r.failures[0][0].endswith("broken.jpg")
    with Collection.open_reader(index_root(), "default") as col:
        assert [os.fsdecode(p) for p, _, _ in col.catalog.failures()] == [
            str(media / "photos" / "broken.jpg")
        ]


def test_second_run_is_unchanged_and_embeds_nothing(tiny_model, media):
    run(tiny_model, media)
    r = run(tiny_model, media)
    assert (r.added, r.updated, r.removed, r.moved, r.unchanged, r.failed) == (0, 0, 0, 0, 6, 1)
    assert r.failed_now == 0  # the broken file is not retried while unchanged


def test_changed_file_is_reembedded(tiny_model, media):
    run(tiny_model, media)
    p = media / "photos" / "p0.jpg"
    make_image(p, pattern=42, size=(64, 48))
    bump_mtime(p)
    r = run(tiny_model, media)
    assert (r.added, r.updated, r.unchanged) == (0, 1, 5)


def test_deleted_file_leaves_the_index(tiny_model, media):
    run(tiny_model, media)
    (media / "photos" / "p1.jpg").unlink()
    r = run(tiny_model, media)
    assert r.removed == 1 and r.files == 5
    assert str(media / "photos" / "p1.jpg") not in paths_in_index()


def test_moved_file_keeps_its_vector(tiny_model, media):
    run(tiny_model, media)
    with Collection.open_reader(index_root(), "default") as col:
        before = col.catalog.files_under([os.fsencode(media)])
    old = media / "photos" / "p2.jpg"
    new = media / "moved" / "renamed.jpg"
    new.parent.mkdir()
    shutil.move(old, new)
    r = run(tiny_model, media)
    assert (r.moved, r.added, r.removed) == (1, 0, 0)
    with Collection.open_reader(index_root(), "default") as col:
        after = col.catalog.files_under([os.fsencode(media)])
    assert after[os.fsencode(new)].id == before[os.fsencode(old)].id


def test_copy_reuses_vectors_and_counts_as_added(tiny_model, media):
    run(tiny_model, media)
    shutil.copy(media / "photos" / "p3.jpg", media / "photos" / "copy.jpg")
    r = run(tiny_model, media)
    assert (r.added, r.moved, r.files) == (1, 0, 7)
    with Searcher(SearchOptions()) as s:
        hits = s.search(image=media / "photos" / "p3.jpg", k=2)
    assert {Path(os.fsdecode(h.path)).name for h in hits} == {"p3.jpg", "copy.jpg"}
    assert hits[0].score == pytest.approx(hits[1].score, abs=1e-6)


def test_failed_file_is_retried_when_it_changes(tiny_model, media):
    run(tiny_model, media)
    broken = media / "photos" / "broken.jpg"
    make_image(broken, pattern=5)
    bump_mtime(broken)
    r = run(tiny_model, media)
    assert (r.added, r.failed) == (1, 0)


def test_failure_record_goes_when_the_file_goes(tiny_model, media):
    run(tiny_model, media)
    (media / "photos" / "broken.jpg").unlink()
    assert run(tiny_model, media).failed == 0


def test_only_given_roots_lose_vanished_files(tiny_model, tmp_path):
    a = make_image(tmp_path / "a" / "x.png", pattern=1).parent
    b = make_image(tmp_path / "b" / "y.png", pattern=2).parent
    run(tiny_model, a, b)
    (b / "y.png").unlink()
    r = run(tiny_model, a)  # b is not a root of this run: y.png stays until b is indexed again
    assert (r.removed, r.files) == (0, 2)
    r = run(tiny_model, b)
    assert (r.removed, r.files) == (1, 1)


def test_sibling_prefix_is_not_under_root(tiny_model, tmp_path):
    make_image(tmp_path / "pics" / "a.png", pattern=1)
    make_image(tmp_path / "pics2" / "b.png", pattern=2)
    run(tiny_model, tmp_path / "pics", tmp_path / "pics2")
    (tmp_path / "pics" / "a.png").unlink()
    r = run(tiny_model, tmp_path / "pics")
    assert r.removed == 1 and str(tmp_path / "pics2" / "b.png") in paths_in_index()


def test_missing_root_is_an_error_and_deletes_nothing(tiny_model, media, tmp_path):
    run(tiny_model, media)
    with pytest.raises(UsageError, match="does not exist"):
        run(tiny_model, tmp_path / "nope")
    assert len(paths_in_index()) == 6


def test_hidden_files_need_the_flag(tiny_model, tmp_path):
    make_image(tmp_path / "d" / ".secret.png", pattern=1)
    make_image(tmp_path / "d" / ".cache" / "c.png", pattern=2)
    make_image(tmp_path / "d" / "shown.png", pattern=3)
    assert run(tiny_model, tmp_path / "d").files == 1
    assert run(tiny_model, tmp_path / "d", hidden=True).files == 3


def test_symlinks(tiny_model, tmp_path):
    real = make_image(tmp_path / "store" / "real.png", pattern=1)
    d = tmp_path / "d"
    d.mkdir()
    (d / "link.png").symlink_to(real)
    (d / "dangling.png").symlink_to(tmp_path / "missing.png")
    (d / "dirlink").symlink_to(tmp_path / "store")
    (d / "loop").symlink_to(d)
    r = run(tiny_model, d)
    assert paths_in_index() == {str(d / "link.png")}
    assert r.failed == 0
    r = run(tiny_model, d, follow_links=True)
    assert paths_in_index() == {str(d / "link.png"), str(d / "dirlink" / "real.png")}


def test_undecodable_file_names_are_kept_exactly(tiny_model, tmp_path):
    d = tmp_path / "names"
    d.mkdir()
    raw = os.path.join(os.fsencode(d), b"caf\xe9.png")
    make_image(Path(os.fsdecode(raw)), pattern=3)
    run(tiny_model, d)
    with Collection.open_reader(index_root(), "default") as col:
        assert raw in col.catalog.files_under([os.fsencode(d)])


def test_model_mismatch_is_refused_then_rebuild_works(tiny_model, other_model, media):
    run(tiny_model, media)
    opts = IndexOptions(
        roots=(media,),
        root_dir=index_root(),
        encoder=EncoderOptions(model=ModelSpec.parse(str(other_model))),
        workers=0,
    )
    with pytest.raises(ModelMismatchError) as e:
        index_paths(opts)
    assert str(tiny_model) in str(e.value) and str(other_model) in str(e.value)
    assert "--rebuild" in str(e.value)
    r = index_paths(IndexOptions(**{**opts.__dict__, "rebuild": True}))
    assert r.added == 6 and r.files == 6


def test_same_weights_under_another_path_is_the_same_model(tiny_model, media, tmp_path):
    run(tiny_model, media)
    copy = shutil.copytree(tiny_model, tmp_path / "copy-of-model")
    r = run(copy, media)
    assert r.unchanged == 6


def test_second_writer_is_refused(tiny_model, media):
    run(tiny_model, media)
    holder = Collection.open_writer(index_root(), "default")
    try:
        with pytest.raises(IndexLockedError, match="another mmsearch"):
            run(tiny_model, media)
        # readers are never blocked by a writer
        with Searcher(SearchOptions()) as s:
            assert s.search(image=media / "photos" / "p0.jpg", k=1)
    finally:
        holder.close()


class Killed(BaseException):
    """Not an Exception nor a KeyboardInterrupt (which commits what is embedded): a crash."""


def test_crash_mid_run_keeps_committed_chunks_and_resumes(tiny_model, tmp_path):
    d = tmp_path / "many"
    for i in range(10):
        make_image(d / f"img{i:02}.png", pattern=100 + i)

    def dies_in_third_chunk(stage, done, total):
        if stage == "embed" and done > 6:
            raise Killed  # as if killed while embedding the third chunk of three files

    with pytest.raises(Killed):
        run(tiny_model, d, commit_every=3, progress=dies_in_third_chunk)
    assert len(paths_in_index()) == 6  # two chunks of three were committed
    # the index still answers queries from its last commit
    with Searcher(SearchOptions()) as s:
        assert len(s.search(image=d / "img00.png", k=50)) == 6
    r = run(tiny_model, d, commit_every=3)
    assert (r.added, r.unchanged, r.files, r.vectors) == (4, 6, 10, 10)


def test_stale_vector_file_is_rebuilt_from_the_catalog(tiny_model, media, home):
    run(tiny_model, media)
    (home / "default" / "vectors.faiss").write_bytes(b"garbage")
    with Searcher(SearchOptions()) as s:
        hits = s.search(image=media / "photos" / "p1.jpg", k=1)
    assert Path(os.fsdecode(hits[0].path)).name == "p1.jpg"


def test_notes_are_chunked_with_line_ranges(tiny_model, tmp_path):
    lines = [f"line {i} " + "word " * 30 for i in range(1, 7)]
    make_note(tmp_path / "n" / "long.txt", "\n".join(lines))
    r = run(tiny_model, tmp_path / "n")
    assert r.files == 1 and r.vectors >= 3
    with Searcher(SearchOptions()) as s:
        hits = s.search(lines[3], k=50, modality="text")
    assert hits[0].start <= 4 <= hits[0].end
    assert all(h.start >= 1 and h.end <= 6 and h.start <= h.end for h in hits)


def test_empty_note_is_a_failure_with_reason(tiny_model, tmp_path):
    make_note(tmp_path / "n" / "empty.md", "   \n")
    r = run(tiny_model, tmp_path / "n")
    assert r.failures and "empty" in r.failures[0][1]


def test_parallel_workers_give_the_same_vectors(tiny_model, tmp_path, home):
    import numpy as np

    d = tmp_path / "par"
    for i in range(12):
        make_image(d / f"i{i}.jpg", pattern=i, size=(80, 60))
    (d / "bad.jpg").write_bytes(b"nope")
    r = run(tiny_model, d, workers=2, commit_every=5, name="par")
    assert (r.added, r.failed) == (12, 1)
    run(tiny_model, d, workers=0, name="seq")
    vecs = {}
    for name in ("par", "seq"):
        with Collection.open_reader(home, name) as col:
            rows = col.catalog.files_under([os.fsencode(d)])
            vecs[name] = {p: col.catalog.units_of(r.id)[0][1] for p, r in rows.items()}
    assert vecs["par"].keys() == vecs["seq"].keys()
    for p in vecs["par"]:
        np.testing.assert_allclose(vecs["par"][p], vecs["seq"][p], atol=1e-6)


def test_run_without_new_files_does_not_load_the_model(tiny_model, media, monkeypatch):
    import mmsearch.pipeline.models as models

    run(tiny_model, media)
    monkeypatch.setattr(models, "create_encoder", lambda *a, **k: pytest.fail("model loaded"))
    opts = IndexOptions(roots=(media,), root_dir=index_root(), workers=0)
    assert index_paths(opts).unchanged == 6
    (media / "photos" / "p1.jpg").unlink()
    assert index_paths(opts).removed == 1


def test_index_without_model_uses_the_index_model(tiny_model, media):
    run(tiny_model, media)
    make_image(media / "photos" / "new.png", pattern=77)
    r = index_paths(IndexOptions(roots=(media,), root_dir=index_root(), workers=0))
    assert (r.added, r.unchanged) == (1, 6)
