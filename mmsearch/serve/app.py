"""`mmsearch serve`'s web app on Starlette: the JSON search API, the indexed files by id, their
thumbnails, and the gallery page (plain HTML/CSS/JS from static/, no build step, no CDN).

Safety: requests must be addressed to an allowed name (by default the loopback names, so another
site's page cannot reach the server through DNS rebinding); with a token, every request carries it
('Authorization: Bearer T', or the cookie that opening any page with ?token=T once sets). Files
are sent only by id and only when they are in a served index. Errors are JSON: {"error": ...}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import os
import secrets
import tempfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import IndexNotFoundError, LoadError, MMSearchError, UsageError
from ..modalities import BY_NAME, TEXT
from .files import NotServed, find
from .live import IndexUnavailable
from .service import ServeOptions, Service, parse_query

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "mmsearch_token"
UPLOAD_FIELDS = ("image", "audio")
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
log = logging.getLogger("mmsearch.serve")


class Json(JSONResponse):
    """JSON in ASCII: a file name that is not UTF-8 reaches the client as the same \\udcXX
    escapes `mmsearch search --json` prints (Starlette's own would fail to encode it)."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class ErrorResponse(Json):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__({"error": message}, status, headers)


def _status(exc: Exception) -> int:
    if isinstance(exc, HTTPException):
        return exc.status_code
    for kind, status in (
        (NotServed, 404),
        (IndexUnavailable, 503),
        (IndexNotFoundError, 404),
        (UsageError, 400),
        (MultiPartException, 400),
        (LoadError, 422),
    ):
        if isinstance(exc, kind):
            return status
    return 500


async def _error(request: Request, exc: Exception) -> ErrorResponse:
    status = _status(exc)
    if isinstance(exc, HTTPException):
        message = str(exc.detail)
    elif isinstance(exc, MMSearchError | NotServed | MultiPartException):
        message = str(exc)
    else:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = f"internal error ({type(exc).__name__}: {exc})"
    return ErrorResponse(status, message)


class Guard:
    """ASGI middleware: the host and token checks of the module docstring, and headers that
    keep responses from being sniffed, framed or leaking the URL as a referrer."""

    def __init__(self, app, token: str | None, allowed_hosts: tuple[str, ...] | None):
        self.app, self.token = app, token
        self.allowed_hosts = None if allowed_hosts is None else frozenset(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is None and self.token and "token" in request.query_params:
            refusal = self._cookie_redirect(request)
        if refusal is not None:
            return await refusal(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("x-content-type-options", "nosniff")
                headers.setdefault("referrer-policy", "no-referrer")
                headers.setdefault("x-frame-options", "DENY")
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request):
        hosts = self.allowed_hosts
        if hosts is not None and (request.url.hostname or "") not in hosts:
            return ErrorResponse(
                403, f"this server answers requests addressed to {', '.join(sorted(hosts))} "
                "only (serving other addresses needs --host and --token)",
            )  # fmt: skip
        if not self.token:
            return None
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else request.cookies.get(COOKIE)
        if "token" in request.query_params:
            given = request.query_params["token"]
        if given and secrets.compare_digest(given.encode(), self.token.encode()):
            return None
        return ErrorResponse(
            401, "missing or wrong token: open the address `mmsearch serve` printed (it ends "
            "in ?token=...), or send 'Authorization: Bearer TOKEN'",
            {"www-authenticate": "Bearer"},
        )  # fmt: skip

    def _cookie_redirect(self, request: Request):
        """?token=T was right: keep it in a cookie, and take it out of the address bar."""
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        url = request.url.remove_query_params("token") if rest else request.url.replace(query="")
        response = RedirectResponse(str(url.replace(scheme="", netloc="")), 303)
        response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


class _Limited:
    """A request body reader that refuses more than `limit` bytes (413), before reading them
    when Content-Length says so."""

    def __init__(self, request: Request, limit: int):
        self.receive, self.limit, self.seen = request.receive, limit, 0
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            self._refuse()

    def _refuse(self):
        raise HTTPException(413, f"upload larger than {self.limit} bytes (see --max-upload-mb)")

    async def __call__(self):
        message = await self.receive()
        self.seen += len(message.get("body", b""))
        if self.seen > self.limit:
            self._refuse()
        return message


def _suffix(upload: UploadFile, kind: str) -> str:
    """The uploaded file's extension if it is one of the modality's, else one from its type."""
    extensions = BY_NAME[kind].extensions
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix in extensions:
        return suffix
    guessed = mimetypes.guess_extension(upload.content_type or "") or ""
    return guessed if guessed in extensions else ""


class _Handlers:
    """The routes' endpoints, over one Service."""

    def __init__(self, service: Service):
        self.service = service

    async def search(self, request: Request):
        query = parse_query(request.query_params.multi_items())
        return Json(await run_in_threadpool(self.service.search, query))

    async def search_by_example(self, request: Request):
        limited = Request(request.scope, _Limited(request, self.service.options.max_upload))
        async with limited.form(max_files=len(UPLOAD_FIELDS), max_fields=100) as form:
            items = list(request.query_params.multi_items())
            files: dict[str, Path] = {}
            names: dict[str, str] = {}  # temporary path -> the name the client gave
            with contextlib.ExitStack() as cleanup:
                for name, value in form.multi_items():
                    if not isinstance(value, UploadFile):
                        items.append((name, value))
                    elif name not in UPLOAD_FIELDS or name in files:
                        raise UsageError(f"upload field {name!r}: send one 'image' or 'audio'")
                    else:
                        files[name] = await self._keep(value, name, cleanup)
                        names[str(files[name])] = value.filename or f"the uploaded {name}"
                query = parse_query(items)
                try:
                    return Json(await run_in_threadpool(self.service.search, query, **files))
                except UsageError as e:  # name the upload as the client did, not our copy
                    message = str(e)
                    for path, name in names.items():
                        message = message.replace(path, name)
                    raise UsageError(message) from None

    async def _keep(self, upload: UploadFile, kind: str, cleanup: contextlib.ExitStack) -> Path:
        """The upload as a file in the private upload directory (removed after the query)."""
        handle = cleanup.enter_context(
            tempfile.NamedTemporaryFile(dir=self.service.uploads, suffix=_suffix(upload, kind))
        )
        while block := await upload.read(1 << 20):
            handle.write(block)
        handle.flush()
        return Path(handle.name)

    def file(self, request: Request):
        live = self.service.index(request.path_params["index"])
        path, modality, st = find(live.searcher().col.catalog, request.path_params["id"])
        media = mimetypes.guess_type(os.fsdecode(path))[0] or "application/octet-stream"
        if modality == TEXT:
            media = "text/plain; charset=utf-8"  # notes are shown, never run or downloaded
        return FileResponse(
            os.fsdecode(path),
            stat_result=st,
            media_type=media,
            headers={"content-security-policy": "sandbox", "cache-control": "private, no-cache"},
        )

    def thumb(self, request: Request):
        live = self.service.index(request.path_params["index"])
        at = request.query_params.get("at")
        try:
            seconds = None if at is None else float(at)
        except ValueError:
            raise UsageError(f"at={at!r} is not a number of seconds") from None
        catalog = live.searcher().col.catalog
        out = self.service.thumbs[live.name].get(catalog, request.path_params["id"], seconds)
        # named by content: the same id is always the same picture
        cache = {"cache-control": "private, max-age=604800"}
        return FileResponse(out, media_type="image/jpeg", headers=cache)

    def indexes(self, request: Request):
        return Json({"indexes": [live.info() for live in self.service.indexes.values()]})

    async def info(self, request: Request):
        return Json(self.service.info())

    async def page(self, request: Request):
        return FileResponse(STATIC / "index.html", headers={"content-security-policy": PAGE_POLICY})


def build_app(service: Service) -> Starlette:
    """The app around a Service (which it closes on shutdown)."""
    h = _Handlers(service)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            service.close()

    routes = [
        Route("/", h.page),
        Route("/api/search", h.search, methods=["GET"]),
        Route("/api/search", h.search_by_example, methods=["POST"]),
        Route("/api/info", h.info),
        Route("/api/indexes", h.indexes),
        Route("/file/{index}/{id}", h.file),
        Route("/thumb/{index}/{id}", h.thumb),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    opts = service.options
    guard = Middleware(Guard, token=opts.token, allowed_hosts=opts.allowed_hosts)
    handled = (Exception, HTTPException, MMSearchError, NotServed, MultiPartException)
    app = Starlette(
        routes=routes,
        middleware=[guard],
        exception_handlers=dict.fromkeys(handled, _error),
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def create_app(options: ServeOptions) -> Starlette:
    """Open the indexes (errors are raised here, before anything listens) and build the app."""
    return build_app(Service(options))
