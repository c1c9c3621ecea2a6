"""Video, and the files a phone's folder holds (m4a memos, HEIC photos), through the whole
product: index them, find a scene at its seconds, find a sound in a video, cut the moment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from test_audio_cli import few_captions, tone
from test_audio_tower import make_tiny_clap
from test_docs import _shell_words, code_blocks
from typer.testing import CliRunner
from videos import make_video, picture

from mmsearch.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(r) -> list[dict]:
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def write_heic(path: Path, pattern: int) -> Path:
    from pillow_heif import register_heif_opener

    register_heif_opener()
    Image.fromarray(picture(pattern, (64, 48))).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    """A phone's folder indexed once (fitting the audio projector takes a while); tests that
    change it work on a copy of the index."""
    base = tmp_path_factory.mktemp("phone")
    root = base / "DCIM"
    # 20 s: three scenes of patterns 1, 2, 3 at 0-7, 7-14, 14-20 s, a 440 Hz tone throughout.
    make_video(root / "trip.mp4", [(1, 7), (2, 7), (3, 6)], tone=440.0)
    make_video(root / "silent.mkv", [(4, 3)], tone=None)
    make_video(root / "memo.m4a", [(0, 3)], tone=3000.0, video=False)
    make_video(root / "voice.webm", [(0, 2)], tone=3000.0, video=False)  # sound only
    write_heic(root / "IMG_0001.heic", pattern=5)
    (root / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    whole = make_video(base / "whole.mkv", [(6, 4), (7, 4), (8, 4)], tone=None)
    data = whole.read_bytes()
    (root / "cut-short.mkv").write_bytes(data[: len(data) * 3 // 5])
    clap = make_tiny_clap(base / "clap")
    index_root = base / "indexes"
    with pytest.MonkeyPatch.context() as mp:
        few_captions(mp)
        r = cli("index", root, "--model", tiny_model, "--audio-model", clap,
                "--index-dir", index_root, "--json")  # fmt: skip
    summary = rows(r)[0]
    assert (summary["added"], summary["failed"], summary["files"]) == (6, 2, 6), r.output
    return root, index_root


@pytest.fixture
def phone(built, home):
    root, index_root = built
    shutil.copytree(index_root, home)
    return root


def query_picture(tmp_path, pattern: int) -> Path:
    path = tmp_path / f"scene{pattern}.png"
    Image.fromarray(picture(pattern, (64, 48))).save(path)
    return path


def test_a_picture_of_a_scene_finds_the_video_at_its_seconds(phone, tmp_path):
    for pattern, (start, end) in [(1, (0, 7)), (2, (7, 14)), (3, (14, 20))]:
        hits = rows(cli("search", "--image", query_picture(tmp_path, pattern), "--type", "video",
                        "--json"))  # fmt: skip
        top = hits[0]
        assert (Path(top["path"]).name, top["modality"]) == ("trip.mp4", "video")
        assert top["start"] == pytest.approx(start, abs=0.3)
        assert top["end"] == pytest.approx(end, abs=0.3)
    # --type video: frames only, each a shot of at most 30 s, from the videos that have them.
    every = rows(cli("search", "--image", query_picture(tmp_path, 1), "--type", "video",
                     "-k", "100", "--json"))  # fmt: skip
    assert {h["modality"] for h in every} == {"video"}
    assert sorted({Path(h["path"]).name for h in every}) == ["cut-short.mkv", "silent.mkv",
                                                             "trip.mp4"]  # fmt: skip
    assert all(0 <= h["end"] - h["start"] <= 30 for h in every)


def test_soundtrack_is_searched_as_audio_with_the_videos_seconds(phone, tmp_path):
    hits = rows(cli("search", "--audio", tone(tmp_path / "a.wav", 440, 2.0), "--type", "audio",
                    "-k", "100", "--json"))  # fmt: skip
    by_file: dict[str, list] = {}
    for h in hits:
        by_file.setdefault(Path(h["path"]).name, []).append((h["start"], h["end"]))
    # The video's sound, the memo and the sound-only webm; the silent video has none.
    assert set(by_file) == {"trip.mp4", "memo.m4a", "voice.webm"}
    windows = sorted(by_file["trip.mp4"])
    # The tiny audio tower's windows (2 s every 1.5 s) over the 20 s soundtrack.
    assert windows[0] == (0, 2) and windows[1] == (1.5, 3.5)
    assert windows[-1][1] == pytest.approx(20, abs=0.1)
    assert len(windows) == 13
    info = rows(cli("info", "--json"))[0]["modalities"]
    assert info["video"]["files"] == 4 and info["audio"]["files"] == 1
    # trip's 3 shots and 13 windows, silent's shot, cut-short's 2 shots, voice.webm's window
    assert info["video"]["vectors"] == 3 + 13 + 1 + 2 + 1


def test_failures_say_why_and_partial_videos_say_what_was_kept(phone):
    fails = {Path(f["path"]).name: f["reason"] for f in rows(cli("failures", "--json"))}
    assert fails.keys() == {"junk.mp4", "cut-short.mkv"}
    assert fails["junk.mp4"].startswith("not a readable MP4 file")
    assert "are kept" in fails["cut-short.mkv"]


def test_heic_photo_is_indexed_upright(phone, tmp_path):
    hits = rows(cli("search", "--image", query_picture(tmp_path, 5), "--type", "image", "--json"))
    assert [Path(h["path"]).name for h in hits] == ["IMG_0001.heic"]
    assert hits[0]["score"] > 0.99


def test_second_run_reads_nothing_and_a_moved_video_keeps_its_vectors(phone, tmp_path):
    summary = rows(cli("index", phone, "--json"))[0]
    assert (summary["added"], summary["unchanged"]) == (0, 6)
    (phone / "trip.mp4").rename(phone / "holiday.mp4")
    try:
        summary = rows(cli("index", phone, "--json"))[0]
        assert (summary["moved"], summary["added"]) == (1, 0)
        hits = rows(cli("search", "--image", query_picture(tmp_path, 2), "--type", "video",
                        "--json"))  # fmt: skip
        assert Path(hits[0]["path"]).name == "holiday.mp4" and hits[0]["start"] >= 6.9
    finally:
        (phone / "holiday.mp4").rename(phone / "trip.mp4")


def test_clip_cuts_the_moment_a_search_found(phone, tmp_path):
    hits = rows(cli("search", "--image", query_picture(tmp_path, 2), "--type", "video", "--json"))
    top = hits[0]
    out = tmp_path / "moment.mp4"
    r = rows(cli("clip", top["path"], "--start", top["start"], "--end", top["end"], "--out", out,
                 "--json"))[0]  # fmt: skip
    # Copied from the keyframe at most a second before the shot, to its end.
    assert r["out"] == str(out) and r["copied"]
    assert top["start"] - 1 <= r["start"] <= top["start"]
    assert r["end"] == pytest.approx(top["end"], abs=0.1)
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == pytest.approx((r["end"] - r["start"]) * 10, abs=2)
    want = picture(2, (64, 48)).astype(int)
    assert np.abs(frames[-10].astype(int) - want).mean() < 20
    # --reencode: exactly the shot.
    exact = rows(cli("clip", top["path"], "--start", top["start"], "--end", top["end"], "--out",
                     tmp_path / "exact.webm", "--reencode", "--json"))[0]  # fmt: skip
    assert not exact["copied"] and (exact["start"], exact["end"]) == (top["start"], top["end"])


def test_clip_errors_are_one_line(phone, tmp_path):
    trip = phone / "trip.mp4"
    r = cli("clip", trip, "--start", "0:05", "--end", "0:06", "--out", tmp_path / "x.txt")
    assert r.exit_code == 2 and "cannot write .txt clips" in r.stderr
    r = cli("clip", trip, "--start", "soon", "--end", "0:06", "--out", tmp_path / "x.mp4")
    assert r.exit_code == 2 and "--start 'soon' is not a time" in r.stderr
    r = cli("clip", phone / "nope.mp4", "--start", "1", "--end", "2", "--out", tmp_path / "x.mp4")
    assert r.exit_code == 2 and "not a file" in r.stderr
    (tmp_path / "taken.mp4").write_bytes(b"mine")
    r = cli("clip", trip, "--start", "1", "--end", "2", "--out", tmp_path / "taken.mp4")
    assert r.exit_code == 2 and "exists; pass --force" in r.stderr
    assert (tmp_path / "taken.mp4").read_bytes() == b"mine"
    r = cli("clip", phone / "junk.mp4", "--start", "1", "--end", "2", "--out", tmp_path / "y.mp4")
    assert r.exit_code == 2 and "not a readable MP4 file" in r.stderr
    assert not (tmp_path / "y.mp4").exists()


def test_without_an_audio_model_videos_keep_their_frames(tiny_model, tmp_path, monkeypatch):
    from mmsearch.errors import ModelError
    from mmsearch.pipeline import models

    def unavailable(*args, **kwargs):
        raise ModelError("no CLAP model here")

    monkeypatch.setattr(models, "attach_audio", unavailable)
    make_video(tmp_path / "v" / "clip.mp4", [(1, 2), (2, 2)], tone=440.0)
    make_video(tmp_path / "v" / "memo.m4a", [(0, 2)], tone=300.0, video=False)
    r = cli("index", tmp_path / "v", "--model", tiny_model, "--json")
    summary = rows(r)[0]
    assert (summary["added"], summary["failed"]) == (1, 1)
    assert "videos are indexed without their sound" in r.stderr
    fails = rows(cli("failures", "--json"))
    assert [Path(f["path"]).name for f in fails] == ["memo.m4a"]
    assert "audio model could not be loaded" in fails[0]["reason"]
    hits = rows(cli("search", "--image", query_picture(tmp_path, 2), "--json"))
    assert [(h["modality"], h["start"]) for h in hits][0] == ("video", pytest.approx(2, abs=0.3))


def test_readme_video_section_runs(phone, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (block,) = code_blocks("### Video")
    home = tmp_path / "user"
    (home / "Videos").mkdir(parents=True)
    shutil.copy(phone / "trip.mp4", home / "Videos" / "party.mp4")
    ran = []
    for line in block.splitlines():
        words = _shell_words(line, home)
        if not words or words[1] == "index":
            continue  # indexing needs the CLAP model; the index here was built with a tiny one
        r = cli(*words[1:])
        assert r.exit_code == 0, (line, r.output)
        ran.append(words[1])
    assert ran.count("clip") >= 1 and ran.count("search") >= 1


def test_catalog_written_before_units_had_a_modality(tmp_path):
    import sqlite3

    from mmsearch.records import FileEntry, Segment
    from mmsearch.storage.catalog import Catalog
    from mmsearch.storage.schema import SCHEMA

    old = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(old)
    db.executescript(SCHEMA.replace(",\n    modality TEXT  --", "  --"))
    db.execute(
        "INSERT INTO files (id, path, modality, size, mtime_ns, hash) "
        "VALUES (1, X'2F612E6D7034', 'video', 1, 1, 'h')"
    )
    db.execute("INSERT INTO units VALUES (7, 1, 0.0, 2.0, ?)", (np.ones(4, np.float32).tobytes(),))
    db.commit()
    db.close()
    reader = Catalog(old, readonly=True)  # read as it is: every unit has its file's modality
    assert reader.units([7])[7].modality == "video"
    assert list(reader.unit_ids_matching("audio")) == []
    reader.close()
    writer = Catalog(old)  # a writer adds the column; old units keep their file's modality
    with writer.transaction():
        fid = writer.add_file(FileEntry(b"/b.mp4", "video", 1, 1), "h2")
        writer.replace_units(fid, [Segment(0.0, 2.0), Segment(0.0, 2.0, modality="audio")],
                             np.ones((2, 4), np.float32))  # fmt: skip
    assert [writer.units([i])[i].modality for i in writer.unit_ids()] == ["video", "video", "audio"]
    assert len(writer.unit_ids_matching("audio")) == 1
    assert [s.modality for s, _ in writer.units_of(fid)] == [None, "audio"]
