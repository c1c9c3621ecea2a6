from __future__ import annotations

import pytest

from mmsearch.errors import LoadError
from mmsearch.loaders.text import chunk_note, decode_note


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
