"""Search filters: --path globs on the absolute path, --after/--before on when a file was taken
(a photo's EXIF date, else its mtime), --min-size/--max-size; applied before the top k, on exact
and IVF indexes alike; bad values refused before any index is opened."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from datetime import datetime

import numpy as np
import pytest
from conftest import make_note, make_photo
from PIL import Image
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.config import IndexOptions, SearchOptions, index_root
from mmsearch.encoders import EncoderIdentity
from mmsearch.errors import UsageError
from mmsearch.filters import FileFilter, parse_date, parse_size, path_pattern
from mmsearch.records import FileEntry, Segment
from mmsearch.search import Searcher
from mmsearch.storage.collection import Collection

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def names(result) -> list[str]:
    assert result.exit_code in (0, 1), result.output
    return sorted(os.path.basename(json.loads(line)["path"]) for line in result.stdout.splitlines())


def exif_taken(when: str) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = when  # DateTimeOriginal, "YYYY:MM:DD HH:MM:SS"
    return exif


def set_mtime(path, when: str) -> None:
    t = datetime.fromisoformat(when).timestamp()
    os.utime(path, (t, t))


@pytest.fixture
def dated(tmp_path, tiny_model):
    """Photos taken in 2019 and 2021 (EXIF), one without EXIF modified in 2022, a note modified
    in 2020 and a large photo; indexed."""
    root = tmp_path / "files"
    make_photo(root / "trips" / "2019.jpg", 1, exif=exif_taken("2019:06:01 12:00:00"))
    make_photo(root / "trips" / "2021.jpg", 2, exif=exif_taken("2021:03:01 08:30:00"))
    set_mtime(make_photo(root / "home" / "no-exif.jpg", 3), "2022-05-05T10:00:00")
    set_mtime(make_note(root / "home" / "todo.md", "buy milk\n"), "2020-01-01T09:00:00")
    make_photo(root / "big" / "large.jpg", 4, size=(900, 700), quality=98)
    # EXIF dates win over mtimes, which are all "now" for the two trips
    assert cli("index", root, "--model", tiny_model).exit_code == 0
    return root


def test_dates_come_from_exif_for_photos_else_from_mtime(dated):
    assert names(cli("search", "x", "--after", "2020-06-01", "--before", "2023", "--json")) == [
        "2021.jpg",
        "no-exif.jpg",
    ]
    assert names(cli("search", "x", "--before", "2020-06-01", "--json")) == ["2019.jpg", "todo.md"]
    # --after is inclusive, --before exclusive, both to the second (local time)
    assert names(cli("search", "x", "--after", "2021-03-01T08:30", "--json")) == [
        "2021.jpg",
        "large.jpg",
        "no-exif.jpg",
    ]
    assert names(cli("search", "x", "--after", "2019-06-01", "--before", "2019-06-01T12:00",
                     "--json")) == []  # fmt: skip


def test_path_globs_match_the_absolute_path(dated, tmp_path, monkeypatch):
    assert names(cli("search", "x", "--path", "*.md", "--json")) == ["todo.md"]
    assert names(cli("search", "x", "--path", f"{dated}/trips/*", "--json")) == [
        "2019.jpg",
        "2021.jpg",
    ]
    # a relative pattern is taken from the current folder; without a wildcard, a folder
    monkeypatch.chdir(dated)
    assert names(cli("search", "x", "--path", "home", "--json")) == ["no-exif.jpg", "todo.md"]
    assert names(cli("search", "x", "--path", "trips/2*", "--path", "big", "--json")) == [
        "2019.jpg",
        "2021.jpg",
        "large.jpg",
    ]
    r = cli("search", "x", "--path", "*.png")
    assert r.exit_code == 1 and "no results" in r.output


def test_size_filters(dated):
    large = os.path.getsize(dated / "big" / "large.jpg")
    small = max(os.path.getsize(p) for p in dated.rglob("*") if p.name != "large.jpg")
    assert small < 40_000 < large
    assert names(cli("search", "x", "--min-size", "40k", "--json")) == ["large.jpg"]
    assert "large.jpg" not in names(cli("search", "x", "--max-size", "40000", "--json"))
    assert names(cli("search", "x", "--min-size", str(large), "--max-size", f"{large}B",
                     "--json")) == ["large.jpg"]  # fmt: skip


def test_filters_apply_before_the_top_k(dated):
    """The only file the filter lets through is returned with -k 1, wherever it ranks."""
    everything = json.loads(cli("search", "x", "--json", "-k", "5").stdout.splitlines()[-1])
    last = os.path.basename(everything["path"])
    r = cli("search", "x", "-k", "1", "--path", f"*/{last}", "--json")
    assert names(r) == [last]
    ranked = cli("search", "x", "-k", "1", "--type", "text", "--path", "*/trips/*", "--json")
    assert ranked.exit_code == 1  # no note there


@pytest.mark.parametrize(
    "args, message",
    [
        (["--after", "yesterday"], "--after 'yesterday' is not a date"),
        (["--before", "2020-13-01"], "--before '2020-13-01' is not a date"),
        (["--after", "2021", "--before", "2020"], "is not before --before"),
        (["--min-size", "10X"], "--min-size '10X' is not a size"),
        (["--min-size", "2M", "--max-size", "1M"], "is above --max-size"),
        (["--path", " "], "--path needs a pattern"),
    ],
)
def test_bad_filter_values_are_refused_before_the_index_opens(args, message):
    r = cli("search", "x", "--index", "does-not-exist", *args)
    assert r.exit_code == 2 and message in r.output and "does-not-exist" not in r.output


def test_parsing():
    assert parse_size("10k") == 10240 and parse_size("1.5M") == 1572864
    assert parse_size("2GiB") == 2 << 30 and parse_size("300") == 300
    assert parse_date("2021") == datetime(2021, 1, 1).timestamp()
    assert parse_date("2021-07") == datetime(2021, 7, 1).timestamp()
    assert (
        parse_date("2021-07-04T10:00+00:00")
        == datetime.fromisoformat("2021-07-04T10:00:00+00:00").timestamp()
    )
    assert path_pattern("*.png") == b"*.png"
    assert path_pattern("/a/b") == b"/a/b/*" and path_pattern("/a/b/") == b"/a/b/*"
    assert path_pattern("~/x*") == os.fsencode(os.path.expanduser("~/x*"))
    assert path_pattern("rel/*.jpg") == os.fsencode(os.path.join(os.getcwd(), "rel/*.jpg"))
    assert not FileFilter() and FileFilter(min_size=0)
    with pytest.raises(UsageError):
        FileFilter.parse(after="2021-02-30")


def test_an_old_catalog_filters_dates_by_mtime(dated, home):
    (catalog,) = home.rglob("catalog.sqlite")
    db = sqlite3.connect(catalog)
    for column in ("taken", "phash", "width", "height"):
        db.execute(f"ALTER TABLE files DROP COLUMN {column}")
    db.commit()
    db.close()
    # the EXIF dates are unknown to it: the two trips count as modified now
    this_year = str(time.localtime().tm_year)
    assert names(cli("search", "x", "--after", this_year, "--json")) == [
        "2019.jpg",
        "2021.jpg",
        "large.jpg",
    ]


# --- an IVF index: synthetic vectors, a lowered threshold ---------------------------------------
DIM = 32


def test_a_narrow_filter_on_an_ivf_index_is_exact():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, DIM))
    x = centres[rng.integers(0, 50, 6000)] + 0.3 * rng.standard_normal((6000, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    with Collection.open_writer(index_root(), "default") as col:
        col.write_manifest(encoder=EncoderIdentity("synthetic", "synthetic", dim=DIM))
        _ = col.vectors
        ids = []
        with col.catalog.transaction():
            for i, v in enumerate(x):
                name = f"/data/{'keep' if i % 500 == 0 else 'other'}/{i}.jpg".encode()
                fid = col.catalog.add_file(FileEntry(name, "image", 1000 + i, 1), f"h{i}")
                ids += col.catalog.replace_units(fid, [Segment()], v[None])[1]
        col.vectors.add(np.array(ids), x)
        col.save_vectors(IndexOptions(roots=(), root_dir=index_root(), exact_below=1000))
    keep = np.arange(0, 6000, 500)
    flt = FileFilter(paths=(b"/data/keep/*",), max_size=1000 + 5000)
    with Searcher(SearchOptions(filters=flt)) as s:
        assert not s.col.vectors.exact
        for q in x[1:60:7]:
            allowed = keep[keep <= 5000]
            want = allowed[np.argsort(-(x[allowed] @ q))][:5]
            hits = s.rank(q, 5)
            assert [int(os.path.basename(h.path)[:-4]) for h in hits] == list(want)
