"""numpy building blocks shared by the query-text towers: activations, layer norm, multi-head
attention, and running small batches on one BLAS thread. Only stdlib and numpy are imported."""

from __future__ import annotations

import contextlib
import math

import numpy as np

# Numerical Recipes' erfc (Chebyshev fit, fractional error < 1.2e-7), Horner coefficients from the
# highest power down. numpy has no erf and scipy takes too long to import; computed in float32
# this is as close to math.erf as torch's own float32 GELU (both ~6e-7 abs on [-12, 12]).
_ERFC = (
    0.17087277,
    -0.82215223,
    1.48851587,
    -1.13520398,
    0.27886807,
    -0.18628806,
    0.09678418,
    0.37409196,
    1.00002368,
    -1.26551223,
)


def gelu(x: np.ndarray) -> np.ndarray:
    u = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = 1 / (1 + np.float32(0.5) * u)
    p = np.full_like(t, _ERFC[0])
    for c in _ERFC[1:]:
        p *= t
        p += np.float32(c)
    p -= u * u
    np.exp(p, out=p)
    p *= t  # erfc(|x| / sqrt 2)
    p *= np.float32(0.5)
    # Phi(x) = 1 - erfc/2 for x >= 0, erfc/2 below: GELU(x) = x * Phi(x)
    phi = np.where(x >= 0, 1 - p, p)
    return x * phi


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
