"""Exceptions raised by the library. Only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class MMSearchError(Exception):
    """Base class: every error the library raises on purpose."""

    exit_code = 2  # as grep and ripgrep: 1 is reserved for "search found nothing"


class UsageError(MMSearchError):
    """The caller asked for something that cannot work (bad path, bad query, bad option)."""

    exit_code = 2


class ModelError(MMSearchError):
    """A model spec could not be resolved or loaded."""


class ModelMismatchError(MMSearchError):
    """An index was built with a different encoder than the one requested."""


class IndexNotFoundError(MMSearchError):
    """The named index does not exist."""


class IndexLockedError(MMSearchError):
    """Another process is writing to the index."""


class IndexFormatError(MMSearchError):
    """The index on disk is damaged or has an unsupported format version."""


class IndexWriteError(MMSearchError):
    """Writing the index failed (disk full, permissions); it is kept as of its last commit."""


class UnsupportedModalityError(MMSearchError):
    """The encoder has no tower for the requested modality."""


class LoadError(MMSearchError):
    """A single file could not be decoded; the reason is recorded and the run goes on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
