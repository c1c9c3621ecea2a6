"""The command line: parses arguments, calls the library, renders results. Nothing else.

Heavy modules (torch, open_clip) are imported only by the commands that need them, so a text
search starts in a fraction of a second.
"""

from __future__ import annotations

import enum
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

from .config import (
    DEFAULT_INDEX,
    DEFAULT_MAX_NOTE_BYTES,
    EncoderOptions,
    IndexOptions,
    ModelSpec,
    RaySettings,
    SearchOptions,
    find_index_root,
    index_root,
)
from .errors import MMSearchError, UsageError
from .modalities import MODALITIES, span_of


class IndexType(str, enum.Enum):
    auto = "auto"
    flat = "flat"
    ivf = "ivf"


# --type: the modalities of modalities.TABLE, or any.
Modality = enum.Enum("Modality", [(m, m) for m in (*MODALITIES, "any")], type=str)
TYPE_HELP = f"What to find: {', '.join(MODALITIES)} or any."


# Exit statuses, as grep and ripgrep use them; shown by --help and in the README.
FOUND, NOTHING_FOUND, ERROR, INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = """Exit status:

\b
  0    success (search: at least one hit)
  1    search found nothing
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
            _say(f"mmsearch: error: {_one_line(_usage_line(e))}", err=True)
            code = ERROR
        except click_errors.ClickException as e:
            _say(f"mmsearch: error: {_one_line(e.format_message())}", err=True)
            code = ERROR
        except typer.Abort:
            _say("mmsearch: aborted", err=True)
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

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check_device(value: str | None) -> str | None:
    if value is not None and not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return value


IndexName = Annotated[str, typer.Option("--index", "-i", help="Index name.")]
IndexDir = Annotated[
    Path | None,
    typer.Option(
        "--index-dir",
        help="Index root. Default: $MMSEARCH_HOME, else the nearest indexes/ folder upward from "
        "here that holds an index, else the per-user data folder (~/.local/share/mmsearch/"
        "indexes on Linux). `mmsearch list` says which.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON lines).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
Device = Annotated[
    str,
    typer.Option("--device", callback=_check_device, help="auto, cpu, cuda, cuda:N or mps."),
]

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


def _shown(path: bytes | str) -> str:
    """A path as one line of text, the same in every table (search, failures, index's skipped
    lines, list): control characters escaped as JSON escapes them (\\n, \\t, \\u001b), bytes that
    are not UTF-8 as \\xff, and backslashes doubled so the escapes are unambiguous."""
    text = os.fsdecode(path) if isinstance(path, bytes) else path
    return _UNSAFE_IN_PATH.sub(_escape, text)


def _one_line(text: str) -> str:
    """A message kept on one line: control characters escaped, backslashes left alone."""
    return _UNSAFE_IN_MESSAGE.sub(_escape, text)


def _emit_json(obj) -> None:
    text = json.dumps(obj, ensure_ascii=False)
    # Undecodable bytes of file names arrive as lone surrogates: print them as \udcXX escapes so
    # the line stays valid UTF-8 and json.loads gives back the str os.fsencode turns into the bytes.
    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    sys.stdout.write(text + "\n")


def _say(text: str, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        stream.buffer.write(text.encode("utf-8", "surrogateescape") + b"\n")
        stream.flush()


def _fail(message: str, code: int = ERROR):
    _say(f"mmsearch: error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


def _os_error(e: OSError) -> str:
    """An OSError as one line naming the path: 'permission denied: /x/y (...)'."""
    what = (e.strerror or type(e).__name__).lower()
    if e.filename is None:
        return f"{what} ({type(e).__name__}: {e}; run with --debug for a traceback)"
    where = _shown(e.filename if isinstance(e.filename, bytes | str) else str(e.filename))
    if e.filename2 is not None:
        where += f" -> {_shown(str(e.filename2))}"
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
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _say("mmsearch: interrupted; everything committed so far is kept", err=True)
            raise typer.Exit(INTERRUPTED) from None
        except OSError as e:
            if debug:
                raise
            _fail(_os_error(e))
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if debug:
                raise
            _fail(f"{type(e).__name__}: {e} (run with --debug for a traceback)")

    return wrapper


def _version(value: bool) -> None:
    if value:
        from . import __version__

        _say(f"mmsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Search your photos, recordings and notes by text, image or sound."""


def _root(index_dir: Path | None) -> Path:
    return index_root(index_dir)


# --- index ------------------------------------------------------------------------------------
@app.command()
@handle_errors
def index(
    paths: Annotated[
        list[Path], typer.Argument(help="Folders or files to index.", show_default=False)
    ],
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="open_clip model: NAME, NAME:TAG, hf-hub:org/repo, local-dir:PATH or a "
            "directory. Default: the index's model, else ViT-B-32:laion2b_s34b_b79k.",
        ),
    ] = None,
    audio_model: Annotated[
        str | None, typer.Option("--audio-model", help="CLAP model for audio files.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Files embedded per model call.")
    ] = 32,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", min=0, help="Decoding processes.")
    ] = None,
    hidden: Annotated[bool, typer.Option("--hidden", help="Include hidden files.")] = False,
    follow_links: Annotated[
        bool, typer.Option("--follow-links", help="Follow directory symlinks.")
    ] = False,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Re-embed everything (e.g. with a new --model).")
    ] = False,
    device: Device = "auto",
    index_type: Annotated[
        IndexType | None,
        typer.Option(
            "--index-type",
            help="Vector index: auto (exact below 300k vectors, IVF tuned to recall@10 >= 0.95 "
            "above), flat (always exact) or ivf (IVF once there are enough vectors to train it). "
            "Remembered by the index. Default: the index's own choice, auto for a new index.",
            show_default=False,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Embed on a Ray cluster: auto (the running one), ray://HOST:PORT, or local "
            "(start one here). Workers must see the files and the model at the same paths.",
            show_default=False,
        ),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option("--ray-actors", min=1, help="Encoder actors (default: one per GPU)."),
    ] = None,
    types: Annotated[
        str | None,
        typer.Option(
            "--types",
            help="Comma-separated types this run indexes: image, text, audio (default: all). "
            "Indexed files of other types are left as they are.",
            show_default=False,
        ),
    ] = None,
    max_note_bytes: Annotated[
        int,
        typer.Option(
            "--max-note-bytes",
            min=1,
            help="Index at most this many bytes of each note; a longer one is indexed up to "
            "here and reported as truncated.",
        ),
    ] = DEFAULT_MAX_NOTE_BYTES,
    as_json: Json = False,
    debug: Debug = False,
):
    """Index folders of images, notes and audio (incremental: only new/changed files are embedded)."""
    from .indexer import check_types, index_paths

    chosen = None
    if types is not None:
        chosen = tuple(t.strip() for t in types.split(",") if t.strip())
        check_types(chosen or ("",))

    ray = None
    if ray_address is not None:
        from .distributed import check_available, quiet

        check_available()
        quiet()
        ray = RaySettings(address=ray_address, actors=ray_actors)
    elif ray_actors is not None:
        raise UsageError("--ray-actors goes with --ray")

    options = IndexOptions(
        roots=tuple(paths),
        name=index_name,
        root_dir=_root(index_dir),
        encoder=EncoderOptions(
            model=ModelSpec.parse(model) if model else None,
            device=device,
            audio_model=audio_model,
        ),
        batch_size=batch_size,
        workers=workers,
        hidden=hidden,
        follow_links=follow_links,
        rebuild=rebuild,
        index_type=index_type.value if index_type else None,
        ray=ray,
        types=chosen,
        max_note_bytes=max_note_bytes,
    )
    show_bar = not as_json and sys.stderr.isatty()
    with _progress(show_bar) as progress, _term_as_interrupt():
        report = index_paths(options, progress=progress)
    for note in report.notes:
        _say(f"mmsearch: {note}", err=True)
    if as_json:
        _emit_json(report.to_dict())
        return
    for path, what in report.partial[:20]:
        _say(f"indexed in part {_shown(path)}: {_one_line(what)}", err=True)
    for path, reason in report.failures[:20]:
        _say(f"skipped {_shown(path)}: {_one_line(reason)}", err=True)
    if len(report.failures) > 20:
        _say(f"... and {len(report.failures) - 20} more (see: mmsearch failures)", err=True)
    r = report
    _say(
        f"index {index_name!r}: {r.added} added, {r.updated} updated, {r.removed} removed, "
        f"{r.moved} moved, {r.unchanged} unchanged, {r.failed} failed; "
        f"{r.files} files, {r.vectors} vectors ({r.seconds:.1f}s)"
    )


class _term_as_interrupt:
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


def _rich_bar(*extra_columns):
    """A transient rich progress bar on stderr: description, bar, done/total, extras, ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.__enter__()
    return bar


class _progress:
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import TextColumn, TimeElapsedColumn

            self.bar = _rich_bar(
                TextColumn("{task.fields[rate]} files/s"), TimeElapsedColumn(), TextColumn("ETA")
            )
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        if self.task is None or stage != self._stage:
            self._stage = stage
            label = {
                "scan": "scanning",
                "embed": "embedding",
                "audio:clap-text": "fitting audio projector (CLAP captions)",
                "audio:clip-text": "fitting audio projector (CLIP captions)",
                "audio:fit": "fitting audio projector",
                "vectors": "building the vector index",
            }.get(stage, stage)
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(label, total=total or None, rate="-")
        task = self.bar.tasks[-1]
        speed = task.speed
        self.bar.update(
            self.task, completed=done, total=total or None, rate=f"{speed:.1f}" if speed else "-"
        )

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


# --- search -----------------------------------------------------------------------------------
@app.command(epilog=EXIT_CODES)
@handle_errors
def search(
    query: Annotated[
        str | None,
        typer.Argument(
            help="Text query; supports 'a + b - c' and weights '2:a'.", show_default=False
        ),
    ] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query by example image.")] = None,
    audio: Annotated[Path | None, typer.Option("--audio", help="Query by example sound.")] = None,
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="Number of results.")] = 10,
    kind: Annotated[Modality, typer.Option("--type", "-t", help=TYPE_HELP)] = Modality.any,
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Search an index by text, image or sound. Exits 1 when nothing is found."""
    from .search import Searcher, check_query

    check_query(query, image, audio)  # the query's terms and files, before any index or model
    options = SearchOptions(
        name=index_name, root_dir=_root(index_dir), k=k, modality=kind.value, device=device
    )
    with Searcher(options) as searcher:
        hits = searcher.search(query, image=image, audio=audio)
        for note in searcher.col.notes:
            _say(f"mmsearch: warning: {note}", err=True)
    if not hits:
        if not as_json:
            _say("no results", err=True)
        raise typer.Exit(NOTHING_FOUND)
    for hit in hits:
        d = hit.to_dict()
        if as_json:
            _emit_json(d)
            continue
        where = ""
        if hit.start is not None:
            if span_of(hit.modality) == "seconds":
                where = f"  [{_clock(hit.start)}-{_clock(hit.end)}]"
            else:
                where = f"  [lines {d['start']}-{d['end']}]"
        _say(f"{hit.rank:>3}  {hit.score:6.3f}  {hit.modality:<5}  {_shown(hit.path)}{where}")


def _clock(seconds: float) -> str:
    m, s = divmod(float(seconds), 60)
    return f"{int(m)}:{s:04.1f}"


# --- audio alignment --------------------------------------------------------------------------
@app.command("align-audio")
@handle_errors
def align_audio(
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    audio_model: Annotated[
        str | None,
        typer.Option("--audio-model", help="CLAP model (default: the index's, else LAION CLAP)."),
    ] = None,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Fit the audio projector into the index's CLIP space again and re-embed its audio."""
    from .indexer import align_audio as realign

    options = IndexOptions(
        roots=(),
        name=index_name,
        root_dir=_root(index_dir),
        encoder=EncoderOptions(device=device, audio_model=audio_model),
    )
    show_bar = not as_json and sys.stderr.isatty()
    with _progress(show_bar) as progress, _term_as_interrupt():
        report = realign(options, progress=progress)
    for note in report.notes:
        _say(f"mmsearch: {note}", err=True)
    if as_json:
        _emit_json(report.to_dict())
    else:
        _say(
            f"index {index_name!r}: audio re-aligned; {report.updated} audio files re-embedded, "
            f"{report.removed} removed, {report.failed_now} failed ({report.seconds:.1f}s)"
        )


# --- fine-tuning --------------------------------------------------------------------------------
Pairs = Annotated[
    Path,
    typer.Argument(
        help="CSV/TSV/JSONL of (path, caption) pairs, or a folder of files with sidecar .txt "
        "captions (a.jpg + a.txt).",
        show_default=False,
    ),
]
AllowOutside = Annotated[
    bool,
    typer.Option(
        "--allow-outside",
        help="Read relative paths that lead outside the pairs file's folder (../); without it "
        "those pairs are skipped. Absolute paths are always read and listed.",
    ),
]


def _pairs_notes(pairs) -> str | None:
    """The files a pairs file pulled in from outside its folder, for stderr."""
    if not pairs.outside:
        return None
    shown = ", ".join(str(p) for p in pairs.outside[:3])
    more = f" and {len(pairs.outside) - 3} more" if len(pairs.outside) > 3 else ""
    return f"read {len(pairs.outside)} files from outside the pairs file's folder: {shown}{more}"


def _skipped_line(counts: dict) -> str:
    from .finetune.pairs import OUTSIDE

    line = "skipped pairs: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return line + (" (--allow-outside reads them)" if OUTSIDE in counts else "")


@app.command()
@handle_errors
def finetune(
    source: Pairs,
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model to start from (any --model spec).")
    ] = "ViT-B-32",
    method: Annotated[
        str, typer.Option("--method", help="head, lora, lock-image or full.")
    ] = "head",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the pairs.")] = 5,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            "-b",
            min=2,
            help="Pairs per step; each pair's negatives are the others in the batch.",
        ),
    ] = 64,
    lr: Annotated[float | None, typer.Option("--lr", help="Default depends on --method.")] = None,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay (not on gains and biases).")
    ] = 0.1,
    warmup_steps: Annotated[
        int | None,
        typer.Option("--warmup-steps", help="Learning-rate warmup (default: 10% of the steps)."),
    ] = None,
    grad_accum: Annotated[
        int,
        typer.Option(
            "--grad-accum", min=1, help="Batches per optimizer step (a larger contrastive batch)."
        ),
    ] = 1,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Files held out for evaluation.")
    ] = 0.1,
    val: Annotated[
        Path | None,
        typer.Option("--val", help="Separate held-out pairs (instead of --val-fraction)."),
    ] = None,
    lora_rank: Annotated[
        int, typer.Option("--lora-rank", min=1, help="Rank of the LoRA adapters (--method lora).")
    ] = 8,
    lora_targets: Annotated[
        str | None, typer.Option("--lora-targets", help="Comma-separated layer names.")
    ] = None,
    grad_checkpointing: Annotated[
        bool,
        typer.Option(
            "--grad-checkpointing", help="Recompute activations: less memory, slower steps."
        ),
    ] = False,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (mixed precision on CUDA and on CPUs with native bf16, else fp32), fp32, "
            "bf16 or fp16 (autocast; fp16 adds loss scaling). Weights stay fp32.",
        ),
    ] = "auto",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the split, the shuffles and the inits.")
    ] = 0,
    audio_model: Annotated[
        str | None,
        typer.Option(
            "--audio-model",
            help="CLAP model whose projector audio pairs train (default: the one --model's "
            "directory carries, else laion/clap-htsat-unfused).",
        ),
    ] = None,
    audio_tower: Annotated[
        str,
        typer.Option(
            "--audio-tower",
            help="Audio pairs: 'head' also trains CLAP's audio projection head (the MLP after "
            "the frozen HTSAT trunk) with the projector, kept if it beats the projector alone "
            "on held-out recall and saved in OUT/audio_model; 'none' trains the projector only.",
        ),
    ] = "none",
    audio_steps: Annotated[
        int,
        typer.Option("--audio-steps", min=1, help="Training steps of --audio-tower head."),
    ] = 300,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out.")] = False,
    allow_outside: AllowOutside = False,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Fine-tune the alignment on your own (file, caption) pairs; keeps the best epoch."""
    from .finetune import FinetuneConfig, read_pairs
    from .finetune import finetune as run_finetune
    from .finetune.audio import TOWERS

    if audio_tower not in TOWERS:
        _fail(f"unknown --audio-tower {audio_tower!r}; use one of: {', '.join(TOWERS)}")
    extra = {}
    if lora_targets:
        extra["lora_targets"] = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    config = FinetuneConfig(
        model=model,
        out=out,
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        grad_accum=grad_accum,
        val_fraction=val_fraction,
        lora_rank=lora_rank,
        grad_checkpointing=grad_checkpointing,
        precision=precision,
        device=device,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        **extra,
    )
    from .items import AUDIO, IMAGE

    pairs = read_pairs(source, allow_outside=allow_outside)
    val_pairs = read_pairs(val, allow_outside=allow_outside) if val is not None else None
    has_audio = bool(pairs.of(AUDIO).pairs)
    result = audio = None
    with _TrainProgress(not as_json and sys.stderr.isatty()) as progress:
        if pairs.of(IMAGE).pairs or not has_audio:
            result = run_finetune(pairs, config, progress=progress, val_pairs=val_pairs)
        if has_audio:
            # Audio pairs train the audio projector against the (tuned) CLIP text tower; it is
            # saved in the model directory, where indexing with --model picks it up.
            from .encoders.clip import materialize_model_dir
            from .finetune.audio import HeadSettings, train_audio_projector

            if result is None:
                materialize_model_dir(ModelSpec.parse(model), config.out, overwrite)
            audio = train_audio_projector(
                pairs,
                config.out,
                audio_model,
                cache_dir=index_root() / ".models",
                val_fraction=max(val_fraction, 0.1),
                seed=seed,
                device=device,
                progress=progress,
                val_pairs=val_pairs if val_pairs is not None and val_pairs.of(AUDIO) else None,
                tower=audio_tower,
                head_settings=HeadSettings(steps=audio_steps, batch_size=batch_size, seed=seed),
            )
    # With image pairs the image run reports the pairs left out (missing files, empty captions,
    # of any modality); with audio pairs only, they are reported here.
    unread = pairs.skipped_counts() if result is None else {}
    if as_json:
        data = result.to_dict() if result else {"out": str(config.out)}
        if unread:
            data["skipped"] = unread
        data["outside"] = [str(p) for p in pairs.outside]
        if audio is not None:
            data["audio"] = audio.to_dict()
        _emit_json(data)
        return
    if _pairs_notes(pairs):
        _say(_pairs_notes(pairs), err=True)
    if result is not None and result.note:
        _say(result.note, err=True)
    if unread:
        _say(_skipped_line(unread), err=True)
    if audio is not None:
        kept = {
            "before": "the previous projector",
            "after": "the fitted projector",
            "head": f"the trained audio head (step {audio.head_step}) and its projector",
        }[audio.kept]
        _say(
            f"audio: {audio.train_pairs} training pairs, {audio.val_pairs} held out; "
            f"kept {kept} ({audio.projector}"
            + (f", {audio.audio_model}" if audio.audio_model else "")
            + ")"
        )
        if audio.head is not None:
            _say(f"audio head: training loss {audio.head_loss[0]:.3f} -> {audio.head_loss[1]:.3f}")
        names = ["before", "projector"] + (["+ head"] if audio.head is not None else [])
        recalls = [audio.before, audio.after] + ([audio.head] if audio.head is not None else [])
        _say(_recall_table(*recalls, names=names, audio=True))
        if audio.skipped:
            _say(
                "skipped audio files: " + ", ".join(f"{v} {k}" for k, v in audio.skipped.items()),
                err=True,
            )
    if result is None:
        _say(f"re-index with it: mmsearch index PATH --model {config.out} --rebuild")
        return
    _say(
        f"{result.method}: {result.train_pairs} training pairs ({result.train_files} files), "
        f"{result.val_pairs} held out ({result.val_files} files); "
        f"{result.samples_per_s:.1f} samples/s"
    )
    _say(_recall_table(result.before, result.after))
    kept = "the model before training" if result.best_epoch == 0 else f"epoch {result.best_epoch}"
    _say(f"kept {kept}; wrote {result.out}" + (f" (curve: {result.curve})" if result.curve else ""))
    if result.skipped:
        _say(_skipped_line(result.skipped), err=True)
    _say(f"re-index with it: mmsearch index PATH --model {result.out} --rebuild")


@app.command("eval")
@handle_errors
def eval_(
    source: Pairs,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model to evaluate (any --model spec).")
    ] = "ViT-B-32",
    audio_model: Annotated[
        str | None,
        typer.Option(
            "--audio-model",
            help="CLAP model for audio pairs (default: the one --model's directory carries, "
            "else laion/clap-htsat-unfused), as indexing with --model uses.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Files embedded per model call.")
    ] = 64,
    allow_outside: AllowOutside = False,
    device: Device = "auto",
    as_json: Json = False,
    debug: Debug = False,
):
    """Retrieval recall@1/5/10 of a model on your pairs: image->text and text->image for image
    pairs, audio->text and text->audio for audio pairs (with the audio tower and projector that
    indexing with --model uses)."""
    from .finetune import evaluate, read_pairs
    from .items import AUDIO, IMAGE

    pairs = read_pairs(source, allow_outside=allow_outside)
    recall = audio = None
    if pairs.of(IMAGE).pairs or not pairs.of(AUDIO).pairs:
        recall = evaluate(pairs, model, device=device, batch_size=batch_size)
    if pairs.of(AUDIO).pairs:
        from .finetune.audio import evaluate_audio

        audio = evaluate_audio(
            pairs, model, audio_model, cache_dir=index_root() / ".models", device=device
        )
    if as_json:
        data = {"model": model, **(recall.to_dict() if recall else {})}
        if audio is not None:
            data["audio"] = audio.to_dict()
        data["skipped"] = pairs.skipped_counts()
        data["outside"] = [str(p) for p in pairs.outside]
        _emit_json(data)
        return
    if _pairs_notes(pairs):
        _say(_pairs_notes(pairs), err=True)
    if pairs.skipped:
        _say(_skipped_line(pairs.skipped_counts()), err=True)
    if recall is not None:
        _say(f"{model}: {recall.images} images, {recall.texts} captions")
        _say(_recall_table(recall))
    if audio is not None:
        _say(f"{model}: {audio.images} audio files, {audio.texts} distinct captions")
        _say(_recall_table(audio, audio=True))
        if audio.skipped:
            _say(
                "skipped audio files: " + ", ".join(f"{v} {k}" for k, v in audio.skipped.items()),
                err=True,
            )


def _recall_table(*recalls, names: list[str] | None = None, audio: bool = False) -> str:
    names = names or (["before", "after"] if len(recalls) == 2 else ["recall"])
    rows = ["            " + "".join(f"{name:>22}" for name in names)]
    arrows = ("a->t", "t->a") if audio else ("i->t", "t->i")
    for direction, arrow in zip(("image_to_text", "text_to_image"), arrows, strict=True):
        for k in sorted(getattr(recalls[0], direction)):
            label = f"{arrow} R@{k}"
            rows.append(
                f"{label:<12}" + "".join(f"{getattr(r, direction)[k]:>22.3f}" for r in recalls)
            )
    return "\n".join(rows)


class _TrainProgress:
    """Training progress on a terminal: a bar over optimizer steps, a line per evaluation."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            self.bar = _rich_bar()
        return self

    def __call__(self, event: str, **info) -> None:
        if self.bar is None:
            return
        if event == "step":
            desc = f"epoch {info['epoch']} loss {info['loss']:.3f}"
            if self.task is None:
                self.task = self.bar.add_task(desc, total=info["steps"])
            self.bar.update(self.task, completed=info["step"], description=desc)
        elif event == "eval" and "recall" in info:
            self.bar.console.print(
                f"epoch {info['epoch']}: mean recall {info['recall'].mean:.3f}", style="dim"
            )
        elif event == "audio-step":
            desc = f"audio head, loss {info['loss']:.3f}"
            if self.task is None:
                self.task = self.bar.add_task(desc, total=info["steps"])
            self.bar.update(self.task, completed=info["step"], description=desc)
        elif event == "audio-eval":
            self.bar.console.print(
                f"audio head step {info['step']}: mean recall {info['recall'].mean:.3f}",
                style="dim",
            )
        elif event in ("load_model", "decode", "features", "data"):
            detail = f" {info.get('done')}/{info.get('total')}" if "done" in info else ""
            self.bar.console.print(f"{event.replace('_', ' ')}{detail}", style="dim", end="\r")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


# --- info, failures, list ---------------------------------------------------------------------
def _vector_index_info(vi: dict) -> dict:
    """An approximate index's search settings and measured recall, from the manifest."""
    keys = ("nprobe", "nlist", "recall_at_10")
    return {k: vi[k] for k in keys if vi.get(k) is not None}


@app.command()
@handle_errors
def info(
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    as_json: Json = False,
    debug: Debug = False,
):
    """Show an index's model, size and counts."""
    from .collection import Collection

    with Collection.open_reader(_root(index_dir), index_name) as col:
        for note in col.notes:
            _say(f"mmsearch: warning: {note}", err=True)
        counts = col.catalog.counts()
        enc = col.encoder_identity or {}
        audio = col.manifest.get("audio_encoder")
        data = {
            "name": index_name,
            "path": str(col.dir.resolve()),
            "model": enc.get("spec"),
            "weights": enc.get("weights"),
            "dim": enc.get("dim"),
            "audio_model": audio.get("spec") if audio else None,
            "files": counts["files"],
            "vectors": counts["vectors"],
            "failures": counts["failures"],
            "modalities": counts["by_modality"],
            "index_type": col.manifest.get("index_type", "IDMap2,FlatIP"),
            **_vector_index_info(col.manifest.get("vector_index") or {}),
            "created": col.manifest.get("created"),
            "updated": col.manifest.get("updated"),
            "format_version": col.manifest.get("format_version"),
            # an interrupted --rebuild or align-audio that the next one resumes
            "unfinished_rebuild": col.manifest.get("pending"),
        }
    if as_json:
        _emit_json(data)
        return
    for key, value in data.items():
        if key == "modalities":
            for m, c in value.items():
                _say(f"{m + ':':<15}{c['files']} files, {c['vectors']} vectors")
        elif value is not None:
            _say(f"{key + ':':<15}{_shown(str(value)) if key in ('path', 'model') else value}")


@app.command()
@handle_errors
def failures(
    index_name: IndexName = DEFAULT_INDEX,
    index_dir: IndexDir = None,
    as_json: Json = False,
    debug: Debug = False,
):
    """List files that could not be indexed, with the reason."""
    from .collection import Collection
    from .items import path_fields

    with Collection.open_reader(_root(index_dir), index_name) as col:
        rows = col.catalog.failures()
    for path, reason, modality in rows:
        if as_json:
            _emit_json({**path_fields(path), "reason": reason, "modality": modality})
        else:
            _say(f"{_shown(path)}: {_one_line(reason)}")


@app.command("list")
@handle_errors
def list_(index_dir: IndexDir = None, as_json: Json = False, debug: Debug = False):
    """List the indexes under the index root, and say where that root is and why."""
    from .collection import Collection, list_indexes

    found = find_index_root(index_dir)
    root = found.path
    _say(f"indexes in {_shown(str(root.absolute()))} ({found.source})", err=True)
    names = list_indexes(root)
    if not names:
        _say("no index there yet; create one with: mmsearch index PATH", err=True)
    for name in names:
        with Collection.open_reader(root, name) as col:
            counts = col.catalog.counts()
            # an index whose model never loaded still says which one it will use
            model = (col.encoder_identity or {}).get("spec") or col.manifest.get("model_spec")
        if as_json:
            _emit_json(
                {
                    "name": name,
                    "model": model,
                    "files": counts["files"],
                    "vectors": counts["vectors"],
                    "root": str(root.absolute()),
                    "root_source": found.source,
                }
            )
        else:
            _say(f"{name}\t{counts['files']} files\t{_shown(str(model))}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
