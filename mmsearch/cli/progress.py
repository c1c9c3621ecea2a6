"""Progress on stderr: a transient rich bar on a terminal, silent otherwise."""

from __future__ import annotations


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
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import TextColumn, TimeElapsedColumn

            self.bar = rich_bar(
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


class TrainProgress:
    """Training progress on a terminal: a bar over optimizer steps, a line per evaluation."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            self.bar = rich_bar()
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
