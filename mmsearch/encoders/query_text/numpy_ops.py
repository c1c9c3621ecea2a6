"""numpy building blocks shared by the query-text towers: activations, layer norm, multi-head
attention, running small batches on one BLAS thread, and the two halves of a layer on two cores.
Only stdlib and numpy are imported."""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable

import numpy as np

# Abramowitz & Stegun 7.1.26: erfc(z) ~ t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + p z),
# z >= 0, absolute error < 1.5e-7. numpy has no erf and scipy takes too long to import; in float32
# GELU below is within 3.4e-7 of math.erf's on [-12, 12], as close as torch's own (3.7e-7).
_ERFC_P = 0.3275911
_ERFC_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def gelu(x: np.ndarray) -> np.ndarray:
    # x Phi(x) = (x + |x| - |x| erfc(|x| / sqrt 2)) / 2: no branch on the sign, few passes
    a = np.abs(x)
    u = a * np.float32(1 / math.sqrt(2))
    t = u * np.float32(_ERFC_P)
    t += np.float32(1)
    np.reciprocal(t, out=t)
    p = t * np.float32(_ERFC_A[-1])
    for c in _ERFC_A[-2::-1]:
        p += np.float32(c)
        p *= t
    u *= u
    np.negative(u, out=u)
    np.exp(u, out=u)
    p *= u  # erfc(|x| / sqrt 2)
    p *= a
    y = x + a
    y -= p
    y *= np.float32(0.5)
    return y


def quick_gelu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflow -> inf -> x / inf = 0, the correct limit
        return x / (1 + np.exp(np.float32(-1.702) * x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = np.float32(math.sqrt(2 / math.pi))
    return np.float32(0.5) * x * (1 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0))


def identity(x: np.ndarray) -> np.ndarray:
    return x


ACTIVATIONS = {
    "gelu": gelu,
    "quick_gelu": quick_gelu,
    "gelu_tanh": gelu_tanh,
    "relu": relu,
    "tanh": np.tanh,
    "identity": identity,
}


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    var = np.mean(d * d, axis=-1, keepdims=True)
    d *= 1 / np.sqrt(var + np.float32(eps))
    d *= w
    d += b
    return d


def split_heads(t: np.ndarray, n: int, heads: int) -> np.ndarray:
    """(n*L, W) or (n, L, W) -> (n, heads, L, W // heads)."""
    return t.reshape(n, -1, heads, t.shape[-1] // heads).transpose(0, 2, 1, 3)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Scaled dot-product attention over split heads, (n, H, Lq, hd) each; `bias` is added to
    the scores (a causal or padding mask: 0 or -inf / a very negative number). Returns
    (n * Lq, H * hd), heads merged back."""
    s = (q * np.float32(1 / math.sqrt(q.shape[-1]))) @ k.transpose(0, 1, 3, 2)
    s += bias
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    a = (s @ v).transpose(0, 2, 1, 3)
    return a.reshape(a.shape[0] * a.shape[1], -1)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w (+ b), w stored (in, out)."""
    y = x @ w
    if b is not None:
        y += b
    return y


# Batches up to this many tokens (a few queries) run BLAS on one thread. OpenBLAS threads spin
# while they wait: on a busy 2-core machine a 12-token query took 0.6-3.5 s with 2 threads and
# 0.1-0.3 s with one; on an idle machine one thread is about as fast for work this small.
SMALL_BATCH_TOKENS = 256
_blas_api: list = []  # [(get_num_threads, set_num_threads)] once looked up, [None] if unavailable


def _find_openblas():
    """numpy's OpenBLAS thread controls via ctypes, or None (not Linux, MKL, not found).

    threadpoolctl does this generally but takes ~80 ms to import; the query path cannot afford it.
    """
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split(None, 5)[-1].strip() for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    import ctypes

    for path in sorted(libs, key=lambda p: "numpy" not in p):  # numpy's own copy first
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", "", "64"):
                name = f"{prefix}openblas_%s_num_threads{suffix}"
                get, set_ = getattr(lib, name % "get", None), getattr(lib, name % "set", None)
                if get is not None and set_ is not None:
                    get.restype = ctypes.c_int
                    set_.argtypes = [ctypes.c_int]
                    return get, set_
    return None


@contextlib.contextmanager
def one_blas_thread():
    if not _blas_api:
        _blas_api.append(_find_openblas())
    api = _blas_api[0]
    if api is None:
        yield
        return
    get, set_ = api
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


# Two halves of a layer at once (`halves`): a query's forward pass is a few dozen matrix
# products of 8-16 rows, where OpenBLAS on one thread is far from the memory bandwidth (it packs
# each weight before using it) and its own threads spin while they wait. Splitting a layer
# Megatron-style (attention by heads, the MLP by hidden units, each half ending in its share of
# the output projection) gives each of two threads half the weights with no exchange until the
# two partial outputs are added. The sum is always formed the same way (half 0 + half 1),
# whether the halves ran at once or one after the other, so a query's vector does not depend on
# how busy the machine was.
PARALLEL: bool | None = None  # None: use a second core when one is idle; tests force either


class _Helper:
    """One daemon thread that runs a function for `halves`, one call at a time."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="mmsearch-half", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, arg = self.jobs.get()
            try:
                self.done.put((True, fn(arg)))
            except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
                self.done.put((False, e))


_helper: list[_Helper] = []
_helper_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has no helper thread: it starts its own
    os.register_at_fork(after_in_child=_helper.clear)


def second_core_idle() -> bool:
    """Whether `halves` may use a second core: there is one, and nothing else is running on it
    now (Linux: the kernel's count of runnable threads at this instant, this one included; a
    load average lags a minute behind, and back-to-back queries would count against
    themselves). Elsewhere: the 1-minute load average under the core count."""
    if PARALLEL is not None:
        return PARALLEL
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if cores < 2:
        return False
    try:
        with open("/proc/loadavg", "rb") as f:  # "0.52 0.58 0.59 2/517 12345"
            return int(f.read().split()[3].split(b"/")[0]) < cores
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0] < cores
    except (AttributeError, OSError):  # no load average (Windows): one core, as before
        return False


def halves(fn: Callable[[int], np.ndarray], at_once: bool) -> np.ndarray:
    """fn(0) + fn(1); with `at_once` (from `second_core_idle`, and the caller holds
    `one_blas_thread` so that BLAS starts no threads of its own) on two threads."""
    if not at_once or not _helper_lock.acquire(blocking=False):
        return fn(0) + fn(1)  # (or the helper is busy with another caller's: one after the other)
    try:
        if not _helper:
            _helper.append(_Helper())
        helper = _helper[0]
        helper.jobs.put((fn, 1))
        try:
            first = fn(0)
        finally:
            ok, second = helper.done.get()
    finally:
        _helper_lock.release()
    if not ok:
        raise second
    return first + second
