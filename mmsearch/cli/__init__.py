"""The command line: parses arguments, calls the library, renders results. Nothing else.

One module per command group; each registers its commands on `app.app` when imported here.
Heavy modules (torch, open_clip) are imported only by the commands that need them, so a text
search starts in a fraction of a second.
"""

from __future__ import annotations

# Imported for their side effect, in the order --help lists the commands.
from . import indexing, searching, clipping, duplicates, serve, compose, finetune, evaluate, distill, manage  # noqa: F401  # isort: skip  # fmt: skip
from .app import ERROR, EXIT_CODES, FOUND, INTERRUPTED, NOTHING_FOUND, app

__all__ = ["ERROR", "EXIT_CODES", "FOUND", "INTERRUPTED", "NOTHING_FOUND", "app", "main"]


def main() -> None:
    app()
