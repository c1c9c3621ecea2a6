"""One thread that runs the towers for every request.

Torch and BLAS are then never entered from two request threads at once (they would fight over the
cores), and texts that arrive together are embedded in one batch per model: on a CPU a batch of 8
short queries costs about what 3 single ones do.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

MAX_BATCH = 64  # texts embedded in one call at most


@dataclass
class _Texts:
    embed: Callable[[list[str]], np.ndarray]  # the model's own embed_texts
    texts: list[str]
    future: Future = field(default_factory=Future)


@dataclass
class _Call:
    fn: Callable
    args: tuple
    future: Future = field(default_factory=Future)


class EncoderThread:
    """Runs embedding calls on one thread; `texts` batches concurrent callers per model."""

    def __init__(self, batch: bool = True):
        self.batch = batch
        self.batches = 0  # embed calls made for texts (to see batching work)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mmsearch-encoder", daemon=True)
        self._thread.start()

    def texts(self, embed: Callable[[list[str]], np.ndarray], texts: list[str]) -> np.ndarray:
        """`embed(texts)`, run on the encoder thread, possibly in one batch with other callers'
        texts for the same `embed`."""
        job = _Texts(embed, list(texts))
        self._jobs.put(job)
        return job.future.result()

    def call(self, fn: Callable, *args):
        """`fn(*args)` on the encoder thread; its exception is raised here."""
        job = _Call(fn, args)
        self._jobs.put(job)
        return job.future.result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while self.batch and len(jobs) < MAX_BATCH:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            # by model: the bound methods of one model are equal
            groups: dict[Callable, list[_Texts]] = {}
            for job in jobs:
                if isinstance(job, _Texts):
                    groups.setdefault(job.embed, []).append(job)
            for group in groups.values():
                self._embed(group)
            for job in jobs:
                if isinstance(job, _Call):
                    _settle(job.future, job.fn, *job.args)
            if None in jobs:
                return

    def _embed(self, group: list[_Texts]) -> None:
        """One embed call for the distinct texts of `group`; each caller gets its rows."""
        unique = list(dict.fromkeys(t for job in group for t in job.texts))
        self.batches += 1
        try:
            rows = dict(zip(unique, group[0].embed(unique), strict=True))
        except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
            for job in group:
                job.future.set_exception(e)
            return
        for job in group:
            job.future.set_result(np.stack([rows[t] for t in job.texts]))


def _settle(future: Future, fn: Callable, *args) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
        future.set_exception(e)
