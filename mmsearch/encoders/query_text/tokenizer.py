"""open_clip's SimpleTokenizer re-implemented over token ids, loading in milliseconds.

Only stdlib and numpy at import. ftfy, html and the `regex` module are imported lazily, and only
for texts whose cleaning or splitting needs them (non-ASCII, '&' entities).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


def byte_order() -> list[int]:
    """Bytes in the order of open_clip's `bytes_to_unicode` (GPT-2's table): a byte's position is
    its BPE id, and 256 + position is its id with the end-of-word suffix."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    return bs + [b for b in range(256) if b not in bs]


def byte_char(b: int) -> str:
    order = byte_order()
    i = order.index(b)
    return chr(b) if i < 188 else chr(256 + i - 188)


# Text that ftfy.fix_text and html.unescape leave unchanged: printable ASCII without '&', plus
# tab/CR/LF (which whitespace cleaning turns into single spaces anyway). Checked against ftfy in the
# tests. Such text skips importing ftfy (~100 ms).
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e\t\n\r]*")
_ASCII_SPLIT_TAIL = r"|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\sa-zA-Z0-9]+"
UNICODE_SPLIT_TAIL = r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean_text(text: str, mode: str) -> str:
    """open_clip's text cleaning (`get_clean_fn(mode)`: ftfy, html unescape, then "lower",
    "whitespace" or "canonicalize"), skipping ftfy for plain ASCII, which it leaves unchanged."""
    if not _PLAIN.fullmatch(text):
        import html

        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if mode == "canonicalize":
        import string

        text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation))
        return " ".join(text.lower().split())
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


def pair_key(left, right):
    """One integer per BPE merge pair (token ids are < 65536)."""
    return left * 65536 + right


class ClipBpeTokenizer:
    """open_clip's SimpleTokenizer (clean, regex split, byte-level BPE with '</w>') over token ids.

    `pair_keys` is sorted `pair_key(left_id, right_id)` of every merge and `pair_ranks` their
    ranks; the merge of rank r produces id 512 + r, exactly as SimpleTokenizer builds its
    vocabulary (checked at export).
    """

    # Uncached words looked up with numpy before building a dict of all merges: the dict costs
    # ~20 ms to build, a query needs a few dozen lookups, indexing a text corpus millions.
    DICT_AFTER = 2000

    def __init__(
        self,
        pair_keys: np.ndarray,
        pair_ranks: np.ndarray,
        specials: dict[str, int],
        context_length: int,
        clean: str,
        sot_id: int,
        eot_id: int,
    ):
        self.pair_keys = np.asarray(pair_keys, dtype=np.int64)
        self.pair_ranks = np.asarray(pair_ranks, dtype=np.int64)
        self.rank_of: dict[int, int] | None = None
        self.misses = 0
        self.specials = dict(specials)
        self.context_length = context_length
        self.clean = clean
        self.sot_id, self.eot_id = sot_id, eot_id
        order = byte_order()
        self.byte_id = [0] * 256
        for i, b in enumerate(order):
            self.byte_id[b] = i
        special = "|".join(specials)
        # open_clip splits with `regex` and IGNORECASE. On ASCII text its classes are exactly these
        # ASCII ones, so the stdlib `re` serves (the `regex` module costs ~25 ms to import).
        self._ascii_pat = re.compile(special + _ASCII_SPLIT_TAIL, re.IGNORECASE)
        self._unicode_pat = None
        self._unicode_src = special + UNICODE_SPLIT_TAIL
        self.cache: dict[str, list[int]] = {}

    def clean_text(self, text: str) -> str:
        return clean_text(text, self.clean)

    def _split(self, text: str) -> list[str]:
        if text.isascii():
            return self._ascii_pat.findall(text)
        if self._unicode_pat is None:
            import regex

            self._unicode_pat = regex.compile(self._unicode_src, regex.IGNORECASE)
        return self._unicode_pat.findall(text)

    def _bpe(self, piece: str) -> list[int]:
        # Same loop as SimpleTokenizer.bpe, on ids: string <-> id is a bijection in CLIP's vocab.
        cached = self.cache.get(piece)
        if cached is not None:
            return cached
        special = self.specials.get(piece)
        if special is not None:
            return [special]
        word = [self.byte_id[b] for b in piece.encode("utf-8")]
        word[-1] += 256
        self.misses += 1
        if self.rank_of is None and self.misses > self.DICT_AFTER:
            self.rank_of = dict(zip(self.pair_keys.tolist(), self.pair_ranks.tolist(), strict=True))
        best_pair = self._best_pair_dict if self.rank_of is not None else self._best_pair_np
        while len(word) > 1:
            best = best_pair(word)
            if best is None:
                break
            first, second, rank = best
            merged = 512 + rank
            new_word, i, n = [], 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(merged)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = new_word
        if len(self.cache) < 100_000:
            self.cache[piece] = word
        return word

    def _best_pair_dict(self, word: list[int]) -> tuple[int, int, int] | None:
        best, best_rank, rank_of = None, None, self.rank_of
        for pair in zip(word, word[1:], strict=False):
            r = rank_of.get(pair_key(*pair))
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = pair, r
        return None if best is None else (best[0], best[1], best_rank)

    def _best_pair_np(self, word: list[int]) -> tuple[int, int, int] | None:
        # Distinct pairs have distinct ranks, so the lowest rank names one pair unambiguously
        # (SimpleTokenizer takes min() over the set of pairs).
        w = np.array(word, dtype=np.int64)
        keys = pair_key(w[:-1], w[1:])
        at = np.searchsorted(self.pair_keys, keys)
        at[at == len(self.pair_keys)] = 0
        found = self.pair_keys[at] == keys
        if not found.any():
            return None
        ranks = np.where(found, self.pair_ranks[at], np.iinfo(np.int64).max)
        j = int(ranks.argmin())
        return word[j], word[j + 1], int(ranks[j])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start/end tokens and without truncation."""
        ids: list[int] = []
        for piece in self._split(self.clean_text(text)):
            ids.extend(self._bpe(piece))
        return ids

    def token_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """[SOT] + ids + [EOT] per text, truncated to the context with EOT kept last."""
        rows = []
        for text in texts:
            row = [self.sot_id, *self.encode(text), self.eot_id]
            if len(row) > self.context_length:
                row = row[: self.context_length]
                row[-1] = self.eot_id
            rows.append(row)
        return rows

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """(n, context_length) int64, zero-padded: what open_clip's tokenizer returns."""
        if isinstance(texts, str):
            texts = [texts]
        rows = self.token_rows(texts)
        out = np.zeros((len(rows), self.context_length), dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out
