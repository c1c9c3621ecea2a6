"""What a server does, apart from HTTP: the served indexes kept warm, queries answered as hits
(each exactly what `mmsearch search --json` prints, plus where to fetch the file and its
thumbnail), and the parameters a query may carry."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_INDEX, SearchOptions, index_root
from ..errors import IndexNotFoundError, UsageError
from ..filters import FileFilter
from ..modalities import MODALITIES
from ..records import Hit
from .encoder import EncoderThread
from .files import ID, THUMBNAILS, NotServed, Thumbnails, thumb_at
from .live import POLL_S, LiveIndex

MAX_K = 1000
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_UPLOAD = 32 << 20  # bytes of one query-by-example request


@dataclass(frozen=True)
class Param:
    """A query parameter that sets a SearchOptions field."""

    field: str
    parse: Callable[[str], object]


def _type(text: str) -> str:
    if text not in (*MODALITIES, "any"):
        raise UsageError(f"unknown type {text!r}; use {', '.join(MODALITIES)} or any")
    return text


def _flag(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True}.get(text.lower())
    if value is None and text.lower() not in ("0", "false", "no", "off", ""):
        raise UsageError(f"{text!r} is not a yes or no; use 1 or 0")
    return bool(value)


def _relevance(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"min_relevance must be between 0 and 1, not {text}")
    return value


# Query parameter -> the SearchOptions field it sets, as the command line's option of that name
# does. A new search option is one line here; /api/info lists them and the gallery shows a
# control for those it knows.
OPTION_PARAMS: dict[str, Param] = {
    "k": Param("k", int),
    "type": Param("modality", _type),
    "group": Param("group", _flag),
    "exclude_self": Param("exclude_self", _flag),
    "min_relevance": Param("min_relevance", _relevance),
}
# Parameters that make SearchOptions.filters, in FileFilter.parse's order: --path (repeatable:
# any of them), --after, --before, --min-size, --max-size.
FILTER_PARAMS = ("path", "after", "before", "min_size", "max_size")
# Parameters of the query itself: text (with query arithmetic), the index, "more like this".
QUERY_PARAMS = ("q", "index", "like", "at")
ACCEPTED = (*QUERY_PARAMS, *OPTION_PARAMS, *FILTER_PARAMS)


@dataclass(frozen=True)
class Query:
    index: str | None = None
    text: str | None = None
    like: str | None = None  # a file id: its stored vectors are the query
    at: float | None = None  # ... only its part starting here
    options: dict = field(default_factory=dict)  # SearchOptions fields


def _number(name: str, parse: Callable, text: str):
    try:
        return parse(text)
    except ValueError:
        raise UsageError(f"parameter {name}={text!r} is not a number") from None


def parse_query(items: list[tuple[str, str]]) -> Query:
    """A query from (name, value) parameters: unknown or repeated ones are refused."""
    values: dict[str, list[str]] = {}
    for name, value in items:
        if name not in ACCEPTED:
            raise UsageError(f"unknown parameter {name!r}; known: {', '.join(ACCEPTED)}")
        values.setdefault(name, []).append(value)
        if len(values[name]) > 1 and name != "path":
            raise UsageError(f"parameter {name!r} given more than once")
    one = {name: given[0] for name, given in values.items()}
    options = {
        param.field: _number(name, param.parse, one[name])
        for name, param in OPTION_PARAMS.items()
        if name in one
    }
    if not 1 <= options.get("k", 1) <= MAX_K:
        raise UsageError(f"k must be between 1 and {MAX_K}")
    if any(name in values for name in FILTER_PARAMS):
        paths, *rest = (values.get("path", ()), *(one.get(n) for n in FILTER_PARAMS[1:]))
        options["filters"] = FileFilter.parse(paths, *rest)
    at = _number("at", float, one["at"]) if "at" in one else None
    return Query(one.get("index"), one.get("q"), one.get("like"), at, options)


@dataclass(frozen=True)
class ServeOptions:
    indexes: tuple[str, ...] = (DEFAULT_INDEX,)
    root_dir: Path = field(default_factory=index_root)
    device: str = "auto"
    token: str | None = None  # required of every request when set
    # The names requests must be addressed to (their Host header); None: any. A server on
    # loopback without a token answers only these, so no other site's page can reach it by
    # giving its own name a loopback address (DNS rebinding).
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    max_upload: int = DEFAULT_MAX_UPLOAD
    batch: bool = True  # embed texts that arrive together in one batch
    poll_s: float = POLL_S


class Service:
    """The served indexes, warm; answers queries as JSON-ready dicts."""

    def __init__(self, options: ServeOptions):
        if not options.indexes:
            raise UsageError("no index to serve")
        self.options = options
        self.encoder = EncoderThread(batch=options.batch)
        self.indexes: dict[str, LiveIndex] = {}
        self.thumbs: dict[str, Thumbnails] = {}
        self.uploads = Path(tempfile.mkdtemp(prefix="mmsearch-uploads-"))  # mode 0700
        try:
            for name in dict.fromkeys(options.indexes):
                base = SearchOptions(name=name, root_dir=options.root_dir, device=options.device)
                live = self.indexes[name] = LiveIndex(base, self.encoder, options.poll_s)
                self.thumbs[name] = Thumbnails(live.snapshot.searcher.col.dir)
                live.snapshot.searcher.embed_texts(["warm up"])  # the text tower, loaded now
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for live in self.indexes.values():
            live.close()
        for thumbs in self.thumbs.values():
            thumbs.close()
        self.encoder.close()
        shutil.rmtree(self.uploads, ignore_errors=True)

    def index(self, name: str | None) -> LiveIndex:
        if name is None:
            return next(iter(self.indexes.values()))
        live = self.indexes.get(name)
        if live is None:
            raise IndexNotFoundError(
                f"index {name!r} is not served here; served: {', '.join(self.indexes)}"
            )
        return live

    def info(self) -> dict:
        return {
            "indexes": list(self.indexes),
            "params": list(ACCEPTED),
            "types": [*MODALITIES, "any"],
            "thumbnails": list(THUMBNAILS),
            "max_upload": self.options.max_upload,
            "max_k": MAX_K,
        }

    def search(self, query: Query, image: Path | None = None, audio: Path | None = None) -> dict:
        """{"hits": [...]}: `mmsearch search --json`'s objects plus `id`, `url` and, for
        modalities with thumbnails, `thumb`."""
        live = self.index(query.index)
        if query.like is None:
            hits = live.search(query.options, query.text, image=image, audio=audio)
        else:
            if query.text or image is not None or audio is not None:
                raise UsageError("like= is a query of its own: give no q, image or audio with it")
            catalog = live.searcher().col.catalog
            vectors = (
                catalog.vectors_with_hash(query.like, query.at) if ID.fullmatch(query.like) else []
            )
            if not vectors:
                raise NotServed(f"no file with id {query.like!r} in index {live.name!r}")
            hits = live.like(query.options, vectors, catalog.modality_with_hash(query.like))
        return {"hits": self._hits(live, hits)}

    def _hits(self, live: LiveIndex, hits: list[Hit]) -> list[dict]:
        ids = live.searcher().col.catalog.hashes_of([h.path for h in hits])
        out = []
        for hit in hits:
            d = hit.to_dict()
            file_id = ids.get(hit.path)
            if file_id is not None:  # None: removed by an index run since it was ranked
                d["id"] = file_id
                d["url"] = f"/file/{live.name}/{file_id}"
                if hit.modality in THUMBNAILS:
                    at = thumb_at(hit.modality, d.get("start"))
                    d["thumb"] = f"/thumb/{live.name}/{file_id}" + (
                        "" if at is None else f"?at={at}"
                    )
            out.append(d)
        return out
