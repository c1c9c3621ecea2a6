"""The Typer app and what every command shares: one-line errors and exit statuses, safe
rendering of paths and messages, JSON output, common options."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

try:  # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from ..config import (
    index_root,
)
from ..errors import MMSearchError

# Exit statuses, as grep and ripgrep use them; shown by --help and in the README.
FOUND, NOTHING_FOUND, ERROR, INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = """Exit status:

\b
  0    success (search: at least one hit)
  1    search found nothing; duplicates found no group
  2    error: a bad option or query, no such index, an unreadable file, ...
  130  interrupted (Ctrl-C); an index run keeps what it committed

Output cut short by a closed pipe (mmsearch search ... | head -1) ends the command quietly
with status 0, as ripgrep does."""


def _usage_line(e: click_errors.UsageError) -> str:
    message = e.format_message().replace("Value error, ", "").rstrip(".")
    where = f"; see '{e.ctx.command_path} --help'" if e.ctx is not None else ""
    return f"{message}{where}"


_NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())


class _OneLineErrors(TyperGroup):
    """Click reports a bad option with a usage block; mmsearch says it in one line, exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as e:  # `mmsearch` alone: the help text
            e.show()
            code = e.exit_code
        except click_errors.UsageError as e:
            say(f"mmsearch: error: {one_line(_usage_line(e))}", err=True)
            code = ERROR
        except click_errors.ClickException as e:
            say(f"mmsearch: error: {one_line(e.format_message())}", err=True)
            code = ERROR
        except typer.Abort:
            say("mmsearch: aborted", err=True)
            code = INTERRUPTED
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _pipe_closed()
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="mmsearch",
    cls=_OneLineErrors,
    help="Search your photos, recordings and notes by text, image or sound.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


_SURROGATE = re.compile("[\udc80-\udcff]")
# What would break a table row or a terminal: control characters (C0, DEL, C1), line and
# paragraph separators, and the surrogates that stand for bytes that are not UTF-8.
_CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff"
_UNSAFE_IN_MESSAGE = re.compile(f"[{_CONTROL}]")
_UNSAFE_IN_PATH = re.compile(f"[{_CONTROL}\\\\]")
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def _escape(m: re.Match) -> str:
    ch = m.group()
    code = ord(ch)
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def shown(path: bytes | str) -> str:
    """A path as one line of text, the same in every table (search, failures, index's skipped
    lines, list): control characters escaped as JSON escapes them (\\n, \\t, \\u001b), bytes that
    are not UTF-8 as \\xff, and backslashes doubled so the escapes are unambiguous."""
    text = os.fsdecode(path) if isinstance(path, bytes) else path
    return _UNSAFE_IN_PATH.sub(_escape, text)


def one_line(text: str) -> str:
    """A message kept on one line: control characters escaped, backslashes left alone."""
    return _UNSAFE_IN_MESSAGE.sub(_escape, text)


def emit_json(obj) -> None:
    text = json.dumps(obj, ensure_ascii=False)
    # Undecodable bytes of file names arrive as lone surrogates: print them as \udcXX escapes so
    # the line stays valid UTF-8 and json.loads gives back the str os.fsencode turns into the bytes.
    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    sys.stdout.write(text + "\n")


def say(text: str, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        stream.buffer.write(text.encode("utf-8", "surrogateescape") + b"\n")
        stream.flush()


def fail(message: str, code: int = ERROR):
    say(f"mmsearch: error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def _os_error(e: OSError) -> str:
    """An OSError as one line naming the path: 'permission denied: /x/y (...)'."""
    what = (e.strerror or type(e).__name__).lower()
    if e.filename is None:
        return f"{what} ({type(e).__name__}: {e}; run with --debug for a traceback)"
    where = shown(e.filename if isinstance(e.filename, bytes | str) else str(e.filename))
    if e.filename2 is not None:
        where += f" -> {shown(str(e.filename2))}"
    hint = {
        errno.EACCES: "check its owner and mode, or use an --index-dir you may write",
        errno.EPERM: "check its owner and mode, or use an --index-dir you may write",
        errno.EROFS: "the file system is mounted read-only",
        errno.ENOSPC: "free some space and run again; what was committed is kept",
    }.get(e.errno)
    return f"{what}: {where}" + (f" ({hint})" if hint else "")


def _pipe_closed() -> None:
    """The reader of our output went away (`| head -1`): stop quietly. Python's advice
    (docs.python.org/3/library/signal.html#note-on-sigpipe): point stdout at devnull so the
    flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def handle_errors(fn):
    """Library errors become one line on stderr and exit 2; --debug shows tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False) or os.environ.get("MMSEARCH_DEBUG")
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
            return result
        except typer.Exit:
            raise
        except BrokenPipeError:
            _pipe_closed()
            raise typer.Exit(FOUND) from None
        except MMSearchError as e:
            if debug:
                raise
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            say("mmsearch: interrupted; everything committed so far is kept", err=True)
            raise typer.Exit(INTERRUPTED) from None
        except OSError as e:
            if debug:
                raise
            fail(_os_error(e))
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if debug:
                raise
            fail(f"{type(e).__name__}: {e} (run with --debug for a traceback)")

    return wrapper


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        say(f"mmsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Search your photos, recordings and notes by text, image or sound."""


def resolve_root(index_dir: Path | None) -> Path:
    return index_root(index_dir)


# --- index ------------------------------------------------------------------------------------


class term_as_interrupt:
    """SIGTERM (kill, a closing terminal) stops a run like Ctrl-C: what is embedded is
    committed first."""

    def __enter__(self):
        import signal

        def stop(signum, frame):
            raise KeyboardInterrupt

        try:
            self.old = signal.signal(signal.SIGTERM, stop)
        except ValueError:  # not the main thread (an embedding application)
            self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            import signal

            signal.signal(signal.SIGTERM, self.old)


def clock(seconds: float) -> str:
    m, s = divmod(float(seconds), 60)
    return f"{int(m)}:{s:04.1f}"
