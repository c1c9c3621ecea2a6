"""`mmsearch serve`: a warm search API and a web gallery over one or more indexes.

Needs the `serve` extra (Starlette, uvicorn, python-multipart): pip install 'mmsearch[serve]'.
"""

from __future__ import annotations

from .service import ServeOptions

__all__ = ["ServeOptions", "create_app"]


def create_app(options: ServeOptions):
    """The ASGI app serving `options.indexes` (opened now: errors are raised here)."""
    from .app import create_app as create

    return create(options)
