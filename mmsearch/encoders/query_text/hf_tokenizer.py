"""A Hugging Face text tower's tokenizer without transformers: the `tokenizers` pipeline the
model's fast tokenizer runs (WordPiece, BPE or Unigram with its normalizer, pre-tokenizer and
special-token template), saved as JSON at export, plus open_clip's cleaning and truncation.

Imports stdlib and numpy; `tokenizers` (~50 ms, no torch) when the tokenizer is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tokenizer import clean_text


class HFTextTokenizer:
    """What open_clip's HFTokenizer (or a transformers fast tokenizer called with
    `truncation=True, max_length=context_length`) returns, over the saved `tokenizers` pipeline.

    `clean` is open_clip's clean mode applied before tokenizing ("whitespace", "lower",
    "canonicalize") or None; `strip_sep_id`, when set, is replaced by 0 after tokenizing, as
    open_clip's `strip_sep_token` does.
    """

    def __init__(
        self,
        tokenizer_json: str,
        context_length: int,
        pad_id: int,
        clean: str | None = None,
        strip_sep_id: int | None = None,
    ):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.clean = clean
        self.strip_sep_id = strip_sep_id
        self._truncate()

    def _truncate(self) -> None:
        self.tokenizer.enable_truncation(
            self.context_length, stride=0, strategy="longest_first", direction="right"
        )

    def _clean(self, texts: Sequence[str]) -> list[str]:
        return [clean_text(t, self.clean) if self.clean else t for t in texts]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens and without truncation."""
        self.tokenizer.no_truncation()
        try:
            return self.tokenizer.encode(self._clean([text])[0], add_special_tokens=False).ids
        finally:
            self._truncate()

    def token_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids per text with the model's special tokens, truncated to the context length."""
        rows = [e.ids for e in self.tokenizer.encode_batch(self._clean(texts))]
        if self.strip_sep_id is not None:
            rows = [[0 if t == self.strip_sep_id else t for t in row] for row in rows]
        return rows

    def pad(self, rows: list[list[int]], length: int) -> np.ndarray:
        out = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """(n, context_length) int64, padded with the pad id: what open_clip's tokenizer returns."""
        if isinstance(texts, str):
            texts = [texts]
        return self.pad(self.token_rows(texts), self.context_length)
