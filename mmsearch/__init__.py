"""mmsearch: search photos, recordings and notes across modalities in one CLIP space.

Library use::

    from mmsearch import IndexOptions, SearchOptions, index_paths, search
    index_paths(IndexOptions(roots=(Path("~/Pictures").expanduser(),)))
    for hit in search("a dog on a beach", SearchOptions(k=5)):
        print(hit.score, hit.path)
"""

from __future__ import annotations

import importlib

from .config import EncoderOptions, IndexOptions, ModelSpec, SearchOptions
from .errors import MMSearchError
from .filters import FileFilter
from .records import Hit, IndexReport

__version__ = "0.1.0"

__all__ = [
    "EncoderOptions",
    "FileFilter",
    "Hit",
    "IndexOptions",
    "IndexReport",
    "MMSearchError",
    "ModelSpec",
    "SearchOptions",
    "index_paths",
    "search",
    "Searcher",
]


def __getattr__(name: str):
    # Lazy: importing mmsearch must stay cheap (the CLI's cold search depends on it).
    if name == "index_paths":
        from .pipeline.run import index_paths

        return index_paths
    if name in ("search", "Searcher"):
        # Not `from . import search`: that looks the name up on this package, which lands here
        # again (RecursionError). The function shadows its submodule's name from now on.
        module = importlib.import_module(".search", __name__)
        globals().update(search=module.search, Searcher=module.Searcher)
        return globals()[name]
    raise AttributeError(name)
