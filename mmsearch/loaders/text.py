"""Notes (.txt, .md): decode as UTF-8 and cut into chunks that fit the text tower's context."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import LoadError
from ..items import Segment


def decode_note(data: bytes) -> str:
    """UTF-8 with undecodable bytes replaced; a note with no text is refused."""
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
    if not text.strip():
        raise LoadError("empty note (no text)")
    return text


def chunk_note(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[Segment]:
    """Consecutive lines packed into chunks of at most `max_tokens` tokens.

    Each chunk records its 1-based inclusive line range. A single line longer than the limit is
    split at word boundaries into several chunks with the same line range. The tokenizer splits on
    whitespace first, so the token count of joined lines is the sum of the lines' counts.
    """
    chunks: list[Segment] = []
    lines: list[str] = []
    start = used = last = 0

    def flush(end: int) -> None:
        nonlocal lines, used
        if lines:
            chunks.append(Segment(start, end, "\n".join(lines)))
        lines, used = [], 0

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n = count_tokens(line)
        if n > max_tokens:
            flush(last)
            for piece in _split_long_line(line, count_tokens, max_tokens):
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


def _split_long_line(line: str, count_tokens, max_tokens: int) -> list[str]:
    pieces, words, used = [], [], 0
    for word in line.split():
        n = count_tokens(word)
        if words and used + n > max_tokens:
            pieces.append(" ".join(words))
            words, used = [], 0
        if n > max_tokens:  # one enormous "word": let the tokenizer truncate it
            pieces.append(word)
            continue
        words.append(word)
        used += n
    if words:
        pieces.append(" ".join(words))
    return pieces
