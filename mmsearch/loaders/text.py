"""Notes (.txt, .md): read and decode a bounded prefix, refuse binary junk, and cut the text into
chunks that fit the text tower's context, in time linear in the note's length."""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import LoadError
from ..records import Segment

READ_BLOCK = 1 << 20  # bytes read (and hashed) at a time
SNIFF_BYTES = 8192  # a NUL byte in the first this-many bytes means binary (as git and grep do)
# Control bytes that text does not contain: C0 except \b \t \n \v \f \r and ESC (terminal logs and
# nroff output use those), plus DEL. Random bytes hold ~10% of them, prose none.
_CONTROL = bytes(range(0x00, 0x08)) + bytes(range(0x0E, 0x1B)) + bytes(range(0x1C, 0x20)) + b"\x7f"
MAX_CONTROL_SHARE = 0.05
MAX_UNDECODABLE_SHARE = 0.3  # with any control byte: random bytes are ~55% of both
BINARY_REASON = "binary content, not a text note"
# Byte order marks, longest first (UTF-32's LE mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_UNIT = {"utf-32-le": 4, "utf-32-be": 4, "utf-16-le": 2, "utf-16-be": 2, "utf-8": 1}
# A line longer than this many characters per token allowed is split, never tokenized whole; a
# word (no whitespace) longer than WORD_CHARS_PER_TOKEN per token is cut. CLIP's BPE takes time
# quadratic in a word's length (16k random letters: 17 s), so nothing unbounded reaches it.
LINE_CHARS_PER_TOKEN = 16
WORD_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Note:
    text: str
    hash: str  # blake2b-16 of the whole file, as loaders.content_hash gives
    warning: str | None = None  # set when only the first max_bytes were kept


def read_note(f: BinaryIO, max_bytes: int | None) -> Note:
    """Hash the whole of `f` in one pass of bounded blocks and decode its first `max_bytes`.

    Binary content is refused (LoadError) as soon as the first block shows it, before the rest
    is read. A longer note keeps its first `max_bytes` (cut at a character boundary) and says so
    in `warning`.
    """
    h = hashlib.blake2b(digest_size=16)
    kept: list[bytes] = []
    room = max_bytes if max_bytes is not None else -1
    total = 0
    while True:
        block = f.read(READ_BLOCK)
        if not block:
            break
        if total == 0 and _looks_binary(block[:SNIFF_BYTES], sniff=True) and not _bom(block)[0]:
            raise LoadError(BINARY_REASON)
        h.update(block)
        total += len(block)
        if room < 0:
            kept.append(block)
        elif room > 0:
            kept.append(block[:room])
            room -= len(kept[-1])
    data = b"".join(kept)
    warning = None
    if len(data) < total:
        data = _cut_at_character(data)
        warning = (
            f"truncated at {len(data)} bytes (the note has {total}; "
            "the rest is not indexed, see --max-note-bytes)"
        )
    return Note(decode_note(data), h.hexdigest(), warning)


def decode_note(data: bytes) -> str:
    """The note's text: UTF-8 (undecodable bytes replaced), or UTF-16/32 when the file starts
    with their byte order mark. Binary content and notes with no text are refused."""
    encoding, bom = _bom(data)
    if encoding and encoding != "utf-8":
        body = data[len(bom) :]
        body = body[: len(body) - len(body) % _UNIT[encoding]]
        text = body.decode(encoding, errors="replace")
        raw = text.encode("utf-8", errors="replace")
    else:
        raw = data
        text = data.decode("utf-8", errors="replace")
    if _looks_binary(raw[:SNIFF_BYTES], sniff=True) or _looks_binary(raw, text=text):
        raise LoadError(BINARY_REASON)
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise LoadError("empty note (no text)")
    return text


def _bom(data: bytes) -> tuple[str | None, bytes]:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding, bom
    return None, b""


def _looks_binary(raw: bytes, sniff: bool = False, text: str | None = None) -> bool:
    """NUL bytes (in the sniffed start of a file), a share of control bytes text never has, or
    (given the decoded `text`) some control bytes among mostly undecodable ones. Legacy 8-bit
    and CJK encodings are mostly undecodable as UTF-8 too, but hold no control bytes."""
    if not raw:
        return False
    if sniff and b"\0" in raw:
        return True
    control = len(raw) - len(raw.translate(None, _CONTROL))
    if control > MAX_CONTROL_SHARE * len(raw):
        return True
    if text is None or not control:
        return False
    return control + text.count("\ufffd") > MAX_UNDECODABLE_SHARE * len(text)


def _cut_at_character(data: bytes) -> bytes:
    """`data` without a character cut in half at its end."""
    encoding, bom = _bom(data)
    if encoding and encoding != "utf-8":
        unit = _UNIT[encoding]
        return data[: len(bom) + (len(data) - len(bom)) // unit * unit]
    # the last character starts at the last byte that is not a continuation byte (10xxxxxx)
    i = len(data) - 1
    while i > 0 and len(data) - i < 4 and data[i] & 0xC0 == 0x80:
        i -= 1
    if i < 0:
        return data
    lead = data[i]
    need = 4 if lead >= 0xF0 else 3 if lead >= 0xE0 else 2 if lead >= 0xC0 else 1
    return data if len(data) - i >= need else data[:i]


def chunk_note(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[Segment]:
    """Consecutive lines packed into chunks of at most `max_tokens` tokens.

    Each chunk records its 1-based inclusive line range. A single line longer than the limit is
    split at word boundaries into several chunks with the same line range. The tokenizer splits on
    whitespace first, so the token count of joined lines is the sum of the lines' counts.

    Linear in the length of `text`: `count_tokens` only ever sees a line of at most
    LINE_CHARS_PER_TOKEN * max_tokens characters or a single word of at most
    WORD_CHARS_PER_TOKEN * max_tokens; a longer word becomes a chunk of its own, cut to that
    length (the text tower would keep no more of it than its context anyway).
    """
    long_line = LINE_CHARS_PER_TOKEN * max_tokens
    long_word = WORD_CHARS_PER_TOKEN * max_tokens
    chunks: list[Segment] = []
    lines: list[str] = []
    start = used = last = 0
    counts: dict[str, int] = {}  # per word, for long lines: prose repeats its words

    def flush(end: int) -> None:
        nonlocal lines, used
        if lines:
            chunks.append(Segment(start, end, "\n".join(lines)))
        lines, used = [], 0

    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        if len(line) > long_line or max(map(len, words)) > long_word:
            n = max_tokens + 1  # certainly split below: never tokenized whole
        else:
            n = count_tokens(line)
        if n > max_tokens:
            flush(last)
            for piece in _split_long_line(words, count_tokens, max_tokens, long_word, counts):
                chunks.append(Segment(number, number, piece))
            continue
        if used + n > max_tokens:
            flush(last)
        if not lines:
            start = number
        lines.append(line)
        used += n
        last = number
    if lines:
        flush(last)
    return chunks


def _split_long_line(
    words: list[str], count_tokens, max_tokens: int, long_word: int, counts: dict[str, int]
) -> list[str]:
    pieces, current, used = [], [], 0
    for word in words:
        if len(word) > long_word:
            n = max_tokens + 1
            word = word[:long_word]
        else:
            n = counts.get(word)
            if n is None:
                n = counts[word] = count_tokens(word)
        if current and used + n > max_tokens:
            pieces.append(" ".join(current))
            current, used = [], 0
        if n > max_tokens:  # one enormous "word": a chunk of its own, cut by the tokenizer
            pieces.append(word)
            continue
        current.append(word)
        used += n
    if current:
        pieces.append(" ".join(current))
    return pieces
