"""`mmsearch serve`: the search API and the web gallery on uvicorn, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
from typing import Annotated

import typer

from ..config import DEFAULT_INDEX
from .app import app, fail, handle_errors, resolve_root, say
from .options import Debug, Device, IndexDir

DEFAULT_PORT = 8765


@app.command()
@handle_errors
def serve(
    index_names: Annotated[
        list[str] | None,
        typer.Option(
            "--index",
            "-i",
            metavar="<str>",
            help="Index to serve; repeat for several (the first is the default). Default: default.",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on. One other than loopback needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = (
        DEFAULT_PORT
    ),
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MMSEARCH_TOKEN",
            help="Require this token of every request: 'Authorization: Bearer TOKEN', or in a "
            "browser the printed address ending in ?token=TOKEN (once; a cookie keeps it).",
        ),
    ] = None,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the gallery in a web browser.")
    ] = False,
    max_upload_mb: Annotated[
        int, typer.Option(min=1, help="Largest query-by-example upload, in MiB.")
    ] = 32,
    index_dir: IndexDir = None,
    device: Device = "auto",
    debug: Debug = False,
):
    """Serve indexes over HTTP: a JSON search API and a web gallery at /. Ctrl-C stops it."""
    try:
        import uvicorn

        from ..serve import ServeOptions, create_app
        from ..serve.service import LOOPBACK_NAMES
    except ImportError as e:
        fail(f"mmsearch serve needs the serve extra ({e.name} is missing): "
             "pip install 'mmsearch[serve]'")  # fmt: skip
    sock = _listen(host, port)  # first: a port in use is said before the indexes load
    with contextlib.ExitStack() as undo:
        undo.callback(sock.close)
        if not token and not _is_loopback(sock):
            fail(f"--host {host} can be reached from other machines: give --token TOKEN (or "
                 "set MMSEARCH_TOKEN), or serve on 127.0.0.1")  # fmt: skip
        options = ServeOptions(
            indexes=tuple(index_names or (DEFAULT_INDEX,)),
            root_dir=resolve_root(index_dir),
            device=device,
            token=token or None,
            # without a token, only requests addressed to this machine's loopback names
            allowed_hosts=None if token else (*LOOPBACK_NAMES, host),
            max_upload=max_upload_mb << 20,
        )
        application = create_app(options)
        url = _address(host, sock) + (f"?token={token}" if token else "")
        names = ", ".join(repr(n) for n in options.indexes)
        say(f"mmsearch: serving index {names} at {url} (Ctrl-C stops)")
        config = uvicorn.Config(
            application, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        if open_browser:
            import webbrowser

            webbrowser.open(url)  # its request waits in the listening socket's queue
        with _signals_stop_quietly():
            uvicorn.Server(config).run(sockets=[sock])
    say("mmsearch: stopped", err=True)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        fail(f"cannot listen on {host}: {e.strerror}")
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        taken = " (pick another --port)" if e.errno == errno.EADDRINUSE else ""
        fail(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}{taken}")
    return sock


def _is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def _address(host: str, sock: socket.socket) -> str:
    """The address to open: the host as given (the machine's name for a wildcard address)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{sock.getsockname()[1]}/"


@contextlib.contextmanager
def _signals_stop_quietly():
    """uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler it found:
    let that be a no-op, so a stop is a clean exit (0), not a KeyboardInterrupt or death by
    SIGTERM. A second Ctrl-C makes uvicorn cancel the app's shutdown, which it logs with a
    traceback of the CancelledError: that is the stop asked for, not an error."""
    wanted = (signal.SIGINT, signal.SIGTERM)
    import logging  # here: every cold command imports this module

    before = {sig: signal.signal(sig, lambda *_: None) for sig in wanted}
    log = logging.getLogger("uvicorn.error")
    log.addFilter(_not_cancelled)
    try:
        yield
    finally:
        log.removeFilter(_not_cancelled)
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _not_cancelled(record) -> bool:
    """False for the cancelled shutdown: starlette sends it to uvicorn as a traceback's text."""
    import asyncio

    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    text = str(record.msg).rstrip()
    return not (text.startswith("Traceback") and text.endswith("CancelledError"))
