"""Search: query arithmetic (query.py), the Searcher (searcher.py), and what shapes its answers
(results.py), batch queries (batch.py) and near-duplicate groups (duplicates.py)."""

from __future__ import annotations

from .query import Term, check_query, check_query_file, combine, parse_query, query_modality
from .searcher import Searcher, search

__all__ = [
    "Searcher",
    "Term",
    "check_query",
    "check_query_file",
    "combine",
    "parse_query",
    "query_modality",
    "search",
]
