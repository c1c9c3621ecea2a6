"""Progress of long commands on stderr, one convention for all of them (index, align-audio,
finetune, eval):

- on a terminal: a transient rich bar (what runs, done/total, rate, ETA), notes above it;
- without one (nohup, CI, a pipe): one line every ~30 s (`MMSEARCH_PROGRESS_SECONDS`), e.g.
  `[10:31:02] training: step 120/400 (epoch 2), 35.2 samples/s, loss 2.314, ETA 2:13`, and a line
  when a stage starts or an epoch is measured;
- with --json: the same reports as JSON lines on stderr (stdout keeps the result).

The library reports through one callback, `progress(event, done=None, total=None, **info)`:
indexing calls it as `progress(stage, done, total)`, training with keywords.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

EVERY_ENV = "MMSEARCH_PROGRESS_SECONDS"
# What a counting event is called on screen (others show their own name).
LABELS = {
    "scan": "scanning",
    "embed": "embedding",
    "audio:clap-text": "fitting audio projector (CLAP captions)",
    "audio:clip-text": "fitting audio projector (CLIP captions)",
    "audio:fit": "fitting audio projector",
    "vectors": "building the vector index",
    "decode": "decoding images",
    "step": "training",
    "audio-step": "training the audio head",
    "embed_images": "embedding images",
    "embed_texts": "embedding captions",
    "embed-audio": "embedding audio",
}


def mode_for(as_json: bool) -> str:
    """bar on a terminal, json with --json, lines otherwise."""
    if as_json:
        return "json"
    return "bar" if sys.stderr.isatty() else "lines"


def rich_bar(*extra_columns):
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


class Progress:
    """The `progress` callback of a command: `Progress(mode_for(as_json))`."""

    def __init__(self, mode: str = "lines", every: float | None = None):
        self.mode = mode  # bar | lines | json | off
        env = os.environ.get(EVERY_ENV)
        self.every = every if every is not None else float(env) if env else 30.0
        self.lock = threading.Lock()
        self.stage = None  # (event, label)
        self.state: dict = {}
        self.started = self.last = 0.0
        self.base = (0, 0)  # done and samples when the stage started
        self.bar = self.task = None
        self.stop = threading.Event()
        self.ticker = None

    def __enter__(self):
        if self.mode == "bar":
            from rich.progress import TextColumn

            self.bar = rich_bar(TextColumn("{task.fields[rate]}"))
        elif self.mode in ("lines", "json") and self.every > 0:
            self.ticker = threading.Thread(target=self._tick, daemon=True)
            self.ticker.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join()
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, event: str, done=None, total=None, **info) -> None:
        if self.mode == "off":
            return
        if event in ("step", "audio-step"):
            done, total = info.pop("step"), info.pop("steps")
        if done is not None:
            self._count(event, done, total, info)
        else:
            self._note(event, info)

    # --- counting stages --------------------------------------------------------------------

    def _count(self, event: str, done: int, total: int | None, info: dict) -> None:
        label = LABELS.get(event, event.replace("_", " "))
        if event == "features":
            label = f"{info.get('tower', '')} features (frozen part, once)".strip()
        elif event == "fit":
            label = f"fitting audio projector ({info.get('stage')})"
        now = time.monotonic()
        with self.lock:
            # a new stage, or the same one counting again (the held-out files after the training ones)
            new = self.stage != (event, label) or (total or None) != self.state.get("total")
            new = new or done < (self.state.get("done") or 0)
            if new:
                self.stage, self.started, self.last = (event, label), now, now
                self.base = (done, info.get("samples", 0))  # rates count from here
            self.state = {"stage": label, "done": done, "total": total or None, **info}
        if self.bar is not None:
            self._draw(new)
        elif self.every <= 0:
            self._emit()
        # else the ticker writes a line once the stage has gone on for `every` seconds: a run
        # that ends sooner (or fails at once) prints no progress at all

    def _report(self) -> dict:
        """The latest state with its rate and ETA (under the lock)."""
        s = dict(self.state)
        elapsed = time.monotonic() - self.started
        s["elapsed_s"] = round(elapsed, 1)
        done, total = s.get("done") or 0, s.get("total")
        since = done - self.base[0]
        # training reports samples besides steps: its rate is in samples
        units = s["samples"] - self.base[1] if "samples" in s else since
        if elapsed > 0 and units > 0:
            s["rate"] = round(units / elapsed, 2)
        if elapsed > 0 and since > 0 and total:
            s["eta_s"] = round(elapsed * (total - done) / since, 1)
        return s

    def _line(self, s: dict) -> str:
        count = f"{s['done']}/{s['total']}" if s.get("total") else f"{s['done']}"
        what = "step " if s["stage"].startswith("training") else ""
        parts = [
            f"{s['stage']}: {what}{count}" + (f" (epoch {s['epoch']})" if "epoch" in s else "")
        ]
        if "rate" in s:
            parts.append(f"{s['rate']:.1f} {'samples/s' if 'samples' in s else 'per s'}")
        if "loss" in s:
            parts.append(f"loss {s['loss']:.3f}")
        if "eta_s" in s:
            parts.append(f"ETA {_clock(s['eta_s'])}")
        return ", ".join(parts)

    def _emit(self) -> None:
        with self.lock:
            if not self.state:
                return
            s = self._report()
            self.last = time.monotonic()
        if self.mode == "json":
            keep = ("stage", "done", "total", "epoch", "loss", "rate", "eta_s", "elapsed_s")
            self._write(json.dumps({"progress": {k: s[k] for k in keep if k in s}}))
        else:
            self._write(f"[{time.strftime('%H:%M:%S')}] {self._line(s)}")

    def _tick(self) -> None:
        while not self.stop.wait(min(self.every, 1.0)):
            if time.monotonic() - self.last >= self.every:
                self._emit()

    def _draw(self, new: bool) -> None:
        with self.lock:
            s = self._report()
        desc = s["stage"] + (f" epoch {s['epoch']}" if "epoch" in s else "")
        desc += f" loss {s['loss']:.3f}" if "loss" in s else ""
        rate = f"{s['rate']:.1f}/s" if "rate" in s else "-"
        if new:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(desc, total=s["total"], rate=rate)
        self.bar.update(self.task, completed=s["done"], total=s["total"], description=desc,
                        rate=rate)  # fmt: skip

    # --- notes --------------------------------------------------------------------------------

    def _note(self, event: str, info: dict) -> None:
        text = _note_text(event, info)
        if text is None:
            return
        if self.bar is not None:
            self.bar.console.print(text, style="dim")
        elif self.mode == "json":
            data = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in info.items()}
            self._write(json.dumps({"event": event, **data}, default=str))
        else:
            self._write(f"[{time.strftime('%H:%M:%S')}] {text}")

    def _write(self, line: str) -> None:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr closed: progress is not worth failing for
            pass


def _note_text(event: str, info: dict) -> str | None:
    """One line for an event worth telling as it happens; None for the others."""
    if event == "load_model":
        return f"loading {info.get('model')}"
    if event == "data":
        return (f"pairs: {info['train_pairs']} training ({info['train_files']} files), "
                f"{info['val_pairs']} held out ({info['val_files']} files)")  # fmt: skip
    if event == "eval" and info.get("epoch") == 0:
        return f"before training: held-out mean recall {info['recall'].mean:.3f}"
    if event == "epoch":
        return (f"epoch {info['epoch']}/{info['epochs']}: training loss {info['loss']:.3f}, "
                f"held-out mean recall {info['recall'].mean:.3f}")  # fmt: skip
    if event == "audio-eval":
        return f"audio head step {info['step']}: mean recall {info['recall'].mean:.3f}"
    if event in ("warning", "resume"):
        return info.get("message") or f"resuming at epoch {info['epoch']}, step {info['step']}"
    return None


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_reported(run, options, as_json: bool):
    """`run(options, progress=...)` with progress on stderr (SIGTERM stops it like Ctrl-C); its
    report's notes on stderr, and with --json the report on stdout. Returns the report."""
    from .app import emit_json, say, term_as_interrupt

    with Progress(mode_for(as_json)) as progress, term_as_interrupt():
        report = run(options, progress=progress)
    for note in report.notes:
        say(f"mmsearch: {note}", err=True)
    if as_json:
        emit_json(report.to_dict())
    return report
