"""Calibrated relevance: for every hit, a number in [0, 1] that means the same for a photo, a note
or a recording and for any query, fitted per index without labels and stored beside its vectors.

Raw cosines are not comparable across modalities (text-text sits far above text-image: the
modality gap) nor across queries. For each pair (query modality, item modality) the index keeps:

- the covariance of the item modality's vectors, so that for any query q the variance of
  its scores over that modality, v(q) = q' C q, is known without scanning;
- a map from the statistic t = score x v(q) / v0 to relevance. A query about something the
  collection does not hold scores all its items alike (small v), so even its best hit is
  discounted; dividing by the spread instead (a z-score) was measured to make such queries look
  present (benchmarks/RESULTS.md, issue 10).

The map is Efron's local false discovery rate, fitted on probe queries scored against a sample of
the item modality: probes are the index's own units of the query modality (its notes, photos or
recordings; a unit never against itself), or for text queries on an index with few notes a
shipped list of generic queries (`data/probe_queries.txt`). The density f of their statistic is
fitted by Poisson regression on a histogram (Lindsey's method), the background (null) by a
Gaussian matched to f's centre, and relevance(t) = 1 - f0(t) / f(t): the share of probe pairs at
that statistic that stand out from the background. It is 0 below f's mode and made
non-decreasing, so within one modality of one query it is monotone in the score. 0.5: a hit
scoring this is as likely to be related to the query as to be one of the background items.

The fit is refitted when the index has changed by more than REFIT_CHANGE (per modality) or its
models changed, at the end of an index run; a reader of an index without one fits it in memory.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from ..errors import ModelError
from .atomic import replace_file

FILE = "relevance.npz"
FORMAT = 1
METHOD = "local fdr of score x query variance (Efron; Lindsey fit, central matching)"
REFIT_CHANGE = 0.2  # a modality's unit count grown or shrunk by more than this since the fit
MOMENT_SAMPLE = 5_000  # vectors per modality for the covariance
BACKGROUND = 2_000  # items per modality the probes are scored against
PROBES = 400  # probe queries per query modality
MIN_OWN_TEXT = 50  # fewer notes than this: text queries are probed with the shipped list
MIN_FIT = 2_000  # fewer probe scores than this: a Gaussian tail instead of a fitted f
UNFITTED_Z = 3.0  # ... with relevance 0.5 this many standard deviations above their mean
# The covariance is shrunk towards that of directions spread evenly (I/d) with the weight of this
# many vectors: with a handful of vectors (one note) their own covariance says nothing, and the
# statistic falls back to the plain score.
PRIOR_VECTORS = 10
RELEVANCE_DIGITS = 4  # what --json shows; closer relevances are not told apart


def probe_queries() -> list[str]:
    text = resources.files("mmsearch").joinpath("data/probe_queries.txt").read_text("utf-8")
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def probes_digest(texts: list[str]) -> str:
    import hashlib  # here: loading OpenSSL costs a cold search ~10 ms, and only a fit needs it

    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


@dataclass
class PairMap:
    """Relevance of one (query modality, item modality) pair as a function of its statistic."""

    scale: float  # v0: the probes' mean score variance over the item modality
    grid: np.ndarray  # statistic values, ascending
    rel: np.ndarray  # relevance at `grid`, non-decreasing, in [0, 1]


@dataclass
class Calibration:
    key: str  # the models the vectors come from (encoder key, audio projector key)
    counts: dict[str, int]  # units per modality when fitted
    cov: dict[str, np.ndarray]
    maps: dict[tuple[str, str], PairMap]
    probes: dict[str, str] = field(default_factory=dict)  # query modality -> "index" | "shipped"
    shipped: tuple[str, np.ndarray] | None = None  # (digest, vectors) of the embedded list

    def stale(self, counts: dict[str, int], key: str) -> bool:
        """Models changed, a modality came or went, or one changed by more than REFIT_CHANGE."""
        if key != self.key or set(counts) != set(self.counts):
            return True
        return any(
            abs(n - self.counts[m]) > REFIT_CHANGE * self.counts[m] for m, n in counts.items()
        )

    def score(
        self, q: np.ndarray, query_modality: str, modality: str, scores: np.ndarray
    ) -> np.ndarray:
        """Relevance of `scores` of query `q` against items of `modality`. A query modality
        without probes of its own (an image query on an index without photos) is read with the
        text map, or without that with any map of that item modality."""
        pairs = [(query_modality, modality), ("text", modality), *sorted(self.maps)]
        m = next((self.maps[p] for p in pairs if p in self.maps and p[1] == modality), None)
        if m is None:
            return np.full(len(scores), np.nan)
        q = np.asarray(q, np.float64)
        t = np.asarray(scores, np.float64) * float(q @ self.cov[modality] @ q) / m.scale
        return np.interp(t, m.grid, m.rel)

    def merge(
        self,
        q: np.ndarray,
        query_modality: str,
        found: dict[str, tuple[np.ndarray, np.ndarray]],
        k: int,
        min_relevance: float | None = None,
    ) -> list[tuple[float, float, int, str]]:
        """The best k of each modality's hits (modality -> (scores, ids)), as (relevance,
        score, id, modality), by relevance (to RELEVANCE_DIGITS, as shown); where it ties (it
        saturates at its ends), the modalities take turns, each in its own order. A modality's
        own top k suffices: within it relevance is monotone in the cosine. Hits below
        `min_relevance` are dropped."""
        rows = []
        for m, (scores, ids) in found.items():
            rel = np.round(self.score(q, query_modality, m, scores), RELEVANCE_DIGITS)
            order = np.argsort(-np.asarray(scores), kind="stable")
            rows += [
                (float(rel[j]), n, float(scores[j]), int(ids[j]), m) for n, j in enumerate(order)
            ]
        rows.sort(key=lambda h: (-h[0], h[1], -h[2]))
        if min_relevance is not None:
            rows = [h for h in rows if h[0] >= min_relevance]
        return [(r, s, i, m) for r, _, s, i, m in rows[:k]]

    # --- file -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays = {}
        for m in self.cov:
            arrays[f"cov.{m}"] = self.cov[m]
        for (a, b), pm in self.maps.items():
            arrays[f"grid.{a}.{b}"], arrays[f"rel.{a}.{b}"] = pm.grid, pm.rel
        if self.shipped is not None:
            arrays["shipped"] = self.shipped[1]
        meta = {
            "format": FORMAT, "method": METHOD, "key": self.key, "counts": self.counts,
            "scales": {f"{a}.{b}": pm.scale for (a, b), pm in self.maps.items()},
            "probes": self.probes, "shipped_digest": self.shipped and self.shipped[0],
        }  # fmt: skip
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Calibration:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"relevance calibration format {meta.get('format')}")
            mods = list(meta["counts"])
            maps = {}
            for pair, scale in meta["scales"].items():
                a, b = pair.split(".")
                maps[(a, b)] = PairMap(scale, z[f"grid.{pair}"], z[f"rel.{pair}"])
            shipped = (meta["shipped_digest"], z["shipped"]) if "shipped" in z.files else None
            return cls(
                key=meta["key"],
                counts={m: int(n) for m, n in meta["counts"].items()},
                cov={m: z[f"cov.{m}"] for m in mods},
                maps=maps,
                probes=meta["probes"],
                shipped=shipped,
            )


# --- fitting ---------------------------------------------------------------------------------
def fit_map(stat: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(grid, relevance) for a sample of probe statistics: 1 - local false discovery rate.
    Without any (one note: nothing to score it against but itself), the background is that of
    directions spread evenly in `dim` dimensions: mean 0, deviation 1/sqrt(dim)."""
    stat = np.asarray(stat, np.float64)
    if len(stat) < 2:
        return _gaussian_map(0.0, dim**-0.5)
    mu, sd = float(stat.mean()), max(float(stat.std()), 1e-9)
    if len(stat) < MIN_FIT:
        return _gaussian_map(mu, sd)
    bins = int(np.clip(np.sqrt(len(stat)), 30, 120))
    edges = np.linspace(stat.min(), stat.max() + 1e-9 * sd, bins + 1)
    counts, _ = np.histogram(stat, edges)
    mid = (edges[1:] + edges[:-1]) / 2
    x = (mid - mu) / sd
    log_f = _poisson_fit(np.vander(x, 8), counts)
    if log_f is None:
        return _gaussian_map(mu, sd)
    q25, q75 = np.quantile(stat, [0.25, 0.75])
    centre = (mid >= q25) & (mid <= q75)
    if centre.sum() < 3:
        return _gaussian_map(mu, sd)
    quad = np.linalg.lstsq(np.vander(x[centre], 3), log_f[centre], rcond=None)[0]
    if quad[0] >= 0:  # no bell in the centre: nothing to match a background to
        return _gaussian_map(mu, sd)
    log_f0 = np.vander(x, 3) @ quad  # pi0 * f0, Efron's central matching
    rel = 1.0 - np.minimum(1.0, np.exp(np.clip(log_f0 - log_f, -50, 50)))
    rel[: int(np.argmax(log_f))] = 0.0
    return mid, np.maximum.accumulate(rel)


def _gaussian_map(mu: float, sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Too few probe scores to fit a density: relevance is a normal CDF, 0.5 at UNFITTED_Z."""
    from math import erf, sqrt

    z = np.linspace(UNFITTED_Z - 4, UNFITTED_Z + 4, 81)
    rel = np.array([0.5 * (1 + erf((v - UNFITTED_Z) / sqrt(2))) for v in z])
    return mu + sd * z, rel


def _poisson_fit(X: np.ndarray, counts: np.ndarray, steps: int = 100) -> np.ndarray | None:
    """log of the fitted Poisson means of `counts` (IRLS, log link); None if it diverges."""
    beta = np.zeros(X.shape[1])
    beta[-1] = np.log(counts.mean() + 1.0)
    ridge = 1e-8 * np.eye(X.shape[1])
    for _ in range(steps):
        eta = np.clip(X @ beta, -50, 50)
        mu = np.exp(eta)
        z = eta + (counts - mu) / mu
        try:
            new = np.linalg.solve(X.T @ (mu[:, None] * X) + ridge, X.T @ (mu * z))
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(new)):
            return None
        done = np.max(np.abs(new - beta)) < 1e-8
        beta = new
        if done:
            break
    return np.clip(X @ beta, -50, 50)


def _pair_map(probes: np.ndarray, items: np.ndarray, cov: np.ndarray, same: bool) -> PairMap:
    v = ((probes @ cov) * probes).sum(1)
    scale = max(float(v.mean()), 1e-12)
    stat = (probes @ items.T) * (v / scale)[:, None]
    if same:  # the probes are the first rows of the items: never a unit against itself
        n = min(len(probes), len(items))
        keep = np.ones(stat.shape, bool)
        keep[np.arange(n), np.arange(n)] = False
        stat = stat[keep]
    stat = stat.ravel()
    return PairMap(scale, *fit_map(stat, items.shape[1]))


def fit(samples: dict[str, np.ndarray], counts: dict[str, int], key: str, text_probes=None):
    """A calibration from `samples` (modality -> that modality's vectors, a random sample in
    random order) and `text_probes`: (digest, vectors) of the shipped probe queries, used when
    the index holds fewer than MIN_OWN_TEXT text units."""
    cov, maps, probes = {}, {}, {}
    for m, x in samples.items():
        x = np.asarray(x, np.float32)
        n, d = x.shape
        centred = x - x.mean(0, dtype=np.float64).astype(np.float32)
        own = (centred.T @ centred).astype(np.float64) / n
        cov[m] = ((n * own + PRIOR_VECTORS * np.eye(d) / d) / (n + PRIOR_VECTORS)).astype(
            np.float32
        )
    # query modality -> (probe vectors, whether they are the first rows of that modality's sample)
    queries = {m: (samples[m][:PROBES], True) for m in samples}
    if len(samples.get("text", ())) < MIN_OWN_TEXT and text_probes is not None:
        queries["text"] = (text_probes[1], False)
    for a, (qv, own) in queries.items():
        probes[a] = "index" if own else "shipped"
        for b, items in samples.items():
            maps[(a, b)] = _pair_map(
                np.asarray(qv, np.float64), np.asarray(items[:BACKGROUND], np.float64),
                cov[b], same=own and a == b,
            )  # fmt: skip
    shipped = text_probes if probes.get("text") == "shipped" else None
    return Calibration(key, dict(counts), cov, maps, probes, shipped)


# --- with an index ----------------------------------------------------------------------------
def models_key(col) -> str:
    audio = col.audio_identity.key if col.audio_identity else None
    return col.encoder_identity.key + (f"+{audio}" if audio else "")


def unit_counts(catalog) -> dict[str, int]:
    by = catalog.counts()["by_modality"]
    return {m: c["vectors"] for m, c in by.items() if c["vectors"]}


def load(col) -> Calibration | None:
    """The index's stored calibration, or None (none yet, unreadable, or for other models)."""
    path = col.data_dir / FILE
    try:
        cal = Calibration.from_bytes(path.read_bytes())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # damaged: searched with one fitted in memory, replaced by the next run
    return cal if col.encoder_identity and cal.key == models_key(col) else None


def fit_index(col, embed_texts, previous: Calibration | None = None, seed: int = 0):
    """Fit a calibration to the index's vectors. `embed_texts(list) -> (n, d)` embeds the
    shipped probe queries when they are needed (reused from `previous` when it has them); when
    it gives None, text queries are read with the maps of the other query modalities."""
    rng = np.random.default_rng(seed)
    cat, dim = col.catalog, col.dim
    counts = unit_counts(cat)
    samples = {}
    for m in counts:
        ids = cat.unit_ids_matching(m)
        ids = rng.permutation(ids)[:MOMENT_SAMPLE]
        samples[m] = cat.vectors_of(ids, dim)
    text_probes = None
    if counts.get("text", 0) < MIN_OWN_TEXT:
        texts = probe_queries()
        digest = probes_digest(texts)
        if previous is not None and previous.shipped is not None and previous.shipped[0] == digest:
            text_probes = previous.shipped
        elif embed_texts is not None and (vectors := embed_texts(texts)) is not None:
            text_probes = (digest, np.asarray(vectors, np.float32))
    return fit(samples, counts, models_key(col), text_probes)


def covering(col, modalities, cal: Calibration | None, embed_texts) -> Calibration:
    """`cal`, or else the index's stored calibration, when it covers `modalities`; otherwise one
    fitted in memory, with a note on `col` (an index made by an older mmsearch, or whose last
    run was killed before fitting one). A model that cannot embed the probe queries leaves
    text queries to the other maps."""

    def probes(texts: list[str]) -> np.ndarray | None:
        try:
            return embed_texts(texts)
        except ModelError:
            return None

    cal = cal or load(col)
    if cal is not None and set(modalities) <= set(cal.cov):
        return cal
    col.notes.append(
        f"index {col.name!r} has no stored relevance calibration for what it holds; fitted one "
        f"for this search (`mmsearch index PATH --index {col.name}` stores one)"
    )
    return fit_index(col, probes)


def refresh(col, embed_texts) -> bool:
    """Refit and store the calibration when there is none or the index changed enough (a
    writer, after its commits). True when it was refitted."""
    previous = load(col)
    if previous is not None and not previous.stale(unit_counts(col.catalog), models_key(col)):
        return False
    if not unit_counts(col.catalog):
        return False
    cal = fit_index(col, embed_texts, previous)
    data = cal.to_bytes()
    replace_file(col.data_dir / FILE, lambda f: f.write(data))
    col.write_manifest(relevance={"file": FILE, "method": METHOD, "fitted_on": cal.counts,
                                  "probes": cal.probes})  # fmt: skip
    return True
