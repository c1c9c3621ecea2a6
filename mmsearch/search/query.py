"""Query arithmetic: `a dog + beach - people`, weights `2:sunset`, and what a query needs
before any index or model is opened (its terms, its files, the modality it is in)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..records import AUDIO, IMAGE, TEXT

_SPLIT = re.compile(r"\s+([+-])\s+")
_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*:\s*(.+)$", re.S)


@dataclass(frozen=True)
class Term:
    weight: float
    text: str


def parse_query(query: str) -> list[Term]:
    """'beach + sunset - people', '2:sunset + beach', '-0.5:night'.

    Terms are separated by ' + ' and ' - ' with spaces around the operator (so 't-shirt' is one
    term); 'W:term' sets a float weight; '-' multiplies the weight by -1.
    """
    parts = _SPLIT.split(" " + query.strip() + " ")
    terms, sign = [], 1.0
    for i, part in enumerate(parts):
        if i % 2 == 1:
            sign = -1.0 if part == "-" else 1.0
            continue
        text = part.strip()
        if not text:
            if i > 0:
                raise UsageError(f"empty term in query {query!r}")
            continue
        weight = 1.0
        m = _WEIGHT.match(text)
        if m:
            weight, text = float(m.group(1)), m.group(2).strip()
        terms.append(Term(sign * weight, text))
    return terms


CANCEL_TOLERANCE = 1e-3  # a weighted sum this short, relative to the weights, is only noise


def combine(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Normalised weighted sum of unit vectors, so scores stay cosines.

    A sum that (nearly) vanishes has no direction worth ranking by: 'dog - dog' embeds 'dog'
    twice, and two rows of a batch may differ in their last bits, leaving a tiny vector whose
    direction is rounding noise. It is refused when its norm is below CANCEL_TOLERANCE times the
    sum of the absolute weights (the norm it would have if the terms all agreed)."""
    q = np.zeros_like(vectors[0], dtype=np.float32)
    for v, w in zip(vectors, weights, strict=True):
        q += np.float32(w) * (v / max(float(np.linalg.norm(v)), 1e-12))
    norm = float(np.linalg.norm(q))
    if norm <= CANCEL_TOLERANCE * sum(abs(float(w)) for w in weights):
        raise UsageError("the query terms cancel each other out (their weighted sum is zero)")
    return q / norm


_WHAT = {"image": "an image file", "sound": "a sound file"}


def check_query_file(path: Path, what: str) -> Path:
    """A query --image or --audio file, checked before any index or model is opened."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"query {what} {path} is a directory, not {_WHAT[what]}")
    if not p.exists():
        raise UsageError(f"query file not found: {path}")
    if not p.is_file():
        raise UsageError(f"query {what} {path} is not a regular file")
    return p


def query_modality(terms: list[Term], image: Path | None, audio: Path | None) -> str:
    """The modality a query is read as for relevance: the one with the largest weight in it
    (text on a tie: 'sunset' + an example photo is a text query)."""
    parts = [(abs(t.weight), TEXT) for t in terms]
    parts += [(1.0, m) for m, path in ((IMAGE, image), (AUDIO, audio)) if path is not None]
    return max(parts, key=lambda p: p[0])[1] if parts else TEXT


def check_query(
    query: str | None, image: Path | None = None, audio: Path | None = None
) -> list[Term]:
    """Everything about a query that needs neither an index nor a model: its terms and files."""
    terms = parse_query(query) if query and query.strip() else []
    if image is not None:
        check_query_file(image, "image")
    if audio is not None:
        check_query_file(audio, "sound")
    if not terms and image is None and audio is None:
        raise UsageError("nothing to search for: give a query text, --image or --audio")
    return terms
