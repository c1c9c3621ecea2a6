from __future__ import annotations

import codecs
import io

import numpy as np
import pytest

from mmsearch.errors import LoadError
from mmsearch.loaders import content_hash
from mmsearch.loaders.text import READ_BLOCK, chunk_note, decode_note, read_note


def words(s: str) -> int:
    return len(s.split())


def test_lines_are_packed_with_line_ranges():
    text = "one two\nthree four\n\nfive six seven\neight\n"
    chunks = chunk_note(text, words, max_tokens=4)
    assert [(c.start, c.end) for c in chunks] == [(1, 2), (4, 5)]
    assert chunks[0].text == "one two\nthree four"


def test_long_line_is_split_with_the_same_line_number():
    text = "intro\n" + " ".join(f"w{i}" for i in range(10)) + "\noutro\n"
    chunks = chunk_note(text, words, max_tokens=4)
    assert [(c.start, c.end) for c in chunks] == [(1, 1), (2, 2), (2, 2), (2, 2), (3, 3)]
    assert all(words(c.text) <= 4 for c in chunks)


def test_decode_replaces_bad_bytes_and_refuses_empty():
    assert decode_note(b"caf\xe9 ok") == "caf\ufffd ok"
    assert decode_note(b"\xef\xbb\xbfhello") == "hello"
    with pytest.raises(LoadError):
        decode_note(b"  \n\t ")


@pytest.mark.parametrize("size", [40, 300, 5000, 100_000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_not_a_note(size, seed):
    with pytest.raises(LoadError) as e:
        decode_note(np.random.default_rng(seed).bytes(size))
    assert e.value.reason == "binary content, not a text note"


def test_binary_is_refused_but_text_with_odd_bytes_is_kept():
    sqlite_like = b"SQLite format 3\x00" + b"\x10\x00\x01\x01" + b"\x00" * 200
    control_junk = bytes([1, 2, 3, 4, 0x0E, 0x1F]) * 50 + b"readable words" * 10  # no NUL
    late_junk = b"a proper first page\n" * 500 + np.random.default_rng(5).bytes(50_000)
    for data in (sqlite_like, control_junk, late_junk):
        with pytest.raises(LoadError, match="binary content, not a text note"):
            decode_note(data)
    # what was indexed before stays indexed: stray Latin-1 bytes, terminal colours, nroff
    # overstrike, DOS line ends and form feeds, a Ctrl-Z at the end
    assert decode_note(b"caf\xe9 au lait\n") == "caf\ufffd au lait\n"
    log = b"\x1b[32mINFO\x1b[0m started\n\x1b[31mERROR\x1b[0m failed\n" * 20
    assert "started" in decode_note(log)
    assert "ls - list" in decode_note(b"N\bNA\bAM\bME\bE\n    ls - list\n")
    assert decode_note(b"page one\r\n\x0cpage two\r\n\x1a").startswith("page one")
    assert "\u4f60\u597d" in decode_note("\u4f60\u597d\uff0c\u4e16\u754c\n".encode())
    gbk = "\u4f60\u597d\uff0c\u4e16\u754c hello\n".encode("gbk") * 50  # not UTF-8, not junk
    assert "hello" in decode_note(gbk)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_a_byte_order_mark_are_decoded(encoding):
    text = "Grüße aus Köln\nzweite Zeile \u4f60\u597d\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    assert decode_note(data) == text


def test_read_note_caps_the_text_at_a_character_and_hashes_the_whole_file():
    data = ("x" + "é" * 3000 + "\n").encode() * 3  # two bytes per é
    note = read_note(io.BytesIO(data), max_bytes=1000)  # 1000 = "x" + 499.5 é: cut to 499
    assert note.text == "x" + "é" * 499
    assert note.warning.startswith("truncated at 999 bytes (the note has 18006;")
    assert note.hash == content_hash(data)
    whole = read_note(io.BytesIO(data), max_bytes=len(data))
    assert whole.text == data.decode() and whole.warning is None and whole.hash == note.hash


class _CountingReader(io.RawIOBase):
    """An endless stream of NUL bytes that counts what was read from it."""

    def __init__(self):
        self.read_bytes = 0

    def readable(self):
        return True

    def readinto(self, b):
        b[:] = bytes(len(b))
        self.read_bytes += len(b)
        return len(b)


def test_binary_note_is_refused_after_its_first_block():
    stream = _CountingReader()  # would never end: a note must be refused before reading on
    with pytest.raises(LoadError, match="binary content"):
        read_note(stream, max_bytes=None)
    assert stream.read_bytes <= READ_BLOCK


def test_chunking_a_long_one_line_note_never_tokenizes_it_whole():
    rng = np.random.default_rng(0)
    vocab = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 9))) for _ in range(500)]
    words_in = [vocab[i] for i in rng.integers(0, len(vocab), 150_000)]
    blob = "q" * 200_000  # one enormous "word" (base64, a hash dump): BPE is quadratic in it
    text = "title\n" + " ".join(words_in) + " " + blob + " tail end\nlast line\n"
    seen = []

    def count(s: str) -> int:
        seen.append(len(s))
        return len(s.split())

    chunks = chunk_note(text, count, max_tokens=75)
    assert max(seen) <= 16 * 75  # nothing the tokenizer is handed grows with the note
    assert (chunks[0].start, chunks[0].text) == (1, "title")
    assert (chunks[-1].start, chunks[-1].text) == (3, "last line")
    body = chunks[1:-1]
    assert all((c.start, c.end) == (2, 2) for c in body)
    assert all(len(c.text.split()) <= 75 for c in body)
    got = " ".join(c.text for c in body).split()
    assert got == words_in + ["q" * 4 * 75, "tail", "end"]  # the blob cut to a bounded chunk
    assert [c.text for c in body].count("q" * 300) == 1


def test_index_max_note_bytes_caps_what_a_note_contributes(tiny_model, tmp_path):
    import os

    from conftest import make_note
    from typer.testing import CliRunner

    from mmsearch.cli import app
    from mmsearch.config import index_root
    from mmsearch.storage.collection import Collection

    note = make_note(
        tmp_path / "notes" / "long.txt", "".join(f"line {i} of a diary\n" for i in range(400))
    )
    args = ["index", str(note.parent), "--model", str(tiny_model), "--workers", "0"]
    result = CliRunner().invoke(app, [*args, "--max-note-bytes", "1000"])
    assert result.exit_code == 0, result.output
    with Collection.open_reader(index_root(), "default") as col:
        row = col.catalog.files_under([b"/"])[os.fsencode(note)]
        lines = [seg for seg, _ in col.catalog.units_of(row.id)]
        assert row.hash == content_hash(note.read_bytes())  # the file's identity: all of it
    kept = note.read_bytes()[:1000].decode().splitlines()
    assert (lines[0].start, lines[-1].end) == (1, len(kept)) and len(kept) < 400
