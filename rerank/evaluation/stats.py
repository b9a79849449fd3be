"""Honest comparisons over queries: confidence intervals and paired significance tests (scipy, seeded).

Everything here works on *per-query* values (one number per evaluated query, the mean over a system's runs,
e.g. random's five seeds), in the same query order for every system, so two systems' vectors are paired.

* :func:`bootstrap_ci`: the 95% interval of a mean over queries, ``scipy.stats.bootstrap`` (BCa, resampling
  queries; the percentile interval below :data:`BCA_MIN_QUERIES` queries or where BCa is undefined). All-equal values give ``(v, v)``; fewer than two
  queries give ``None`` (no interval can be estimated from one query).
* :func:`paired_test`: system A against system B on the same queries, the paired randomization test
  (``scipy.stats.permutation_test`` with ``permutation_type="samples"``: each query's two values are swapped at
  random, the statistic is the mean difference; exact for small query counts, ``n_resamples`` random
  swaps otherwise), two-sided. ``significant`` is ``p < alpha`` (0.05); p-values are *not* corrected for the
  number of systems compared. The mean difference also gets its bootstrap interval.

Seeds: every call takes ``seed``; :func:`derive_seed` makes one per (run seed, metric) for the intervals (every system
is resampled with the same query draws) and per (run seed, both systems, metric) for the tests, so a report is the
same on every run and does not depend on the order the systems ran in.
"""

from __future__ import annotations

import json
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from indexing.errors import ConfigError

CONFIDENCE = 0.95
ALPHA = 0.05
N_RESAMPLES = 10_000  # bootstrap resamples
N_PERMUTATIONS = 5_000  # random swaps of the randomization test (p resolves to 2e-4; 10 000 cost 4 s of CPU per test at 2,000 queries)
#: below this many queries the percentile interval is used (BCa's bias and acceleration estimates are unstable there)
BCA_MIN_QUERIES = 30
#: the metrics that get intervals and tests in the harness's reports
STAT_METRICS: tuple[str, ...] = ("ndcg@10", "mrr@10")
CI_METHOD = (f"bootstrap over queries (scipy.stats.bootstrap, {N_RESAMPLES} resamples; BCa from {BCA_MIN_QUERIES} queries, percentile "
             f"below), {int(CONFIDENCE * 100)}% interval of the mean")
TEST_METHOD = (f"paired randomization test over queries (scipy.stats.permutation_test, permutation_type='samples', statistic: the "
               f"mean difference, {N_PERMUTATIONS} random swaps, exact up to 12 queries), two-sided; significant: p < {ALPHA} (not corrected for the "
               "number of systems)")


def derive_seed(seed: int, *parts: Any) -> int:
    """A 32-bit seed from the run's seed and names (stable across runs and Python versions)."""
    return zlib.crc32(json.dumps([seed, *parts], default=str).encode())


def _vector(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise ConfigError(f"{what}: per-query values must be finite")
    return x


def bootstrap_ci(values: Sequence[float], *, seed: int, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES) -> tuple[float, float] | None:
    """The ``confidence`` interval of the mean of ``values`` (one per query); see the module doc."""
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    x = _vector(values, "bootstrap_ci")
    if x.size < 2:
        return None
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    for method in (("BCa", "percentile") if x.size >= BCA_MIN_QUERIES else ("percentile",)):
        with warnings.catch_warnings():  # BCa warns (and returns NaN) on degenerate resamples; the percentile interval follows
            warnings.simplefilter("ignore")
            res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method=method,
                                  vectorized=True, random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            return lo, hi
    return float(x.mean()), float(x.mean())  # pragma: no cover - the percentile interval is always finite for finite input


@dataclass(frozen=True)
class PairedTest:
    """A against B on the same queries: mean difference (A - B), its interval, the p-value, the verdict."""

    diff: float
    p: float | None
    significant: bool
    diff_ci95: tuple[float, float] | None
    n: int

    @property
    def better(self) -> bool:
        """A is significantly better than B."""
        return self.significant and self.diff > 0

    def to_dict(self, digits: int = 6) -> dict[str, Any]:
        return {"diff": round(self.diff, digits), "p": None if self.p is None else round(self.p, digits), "significant": self.significant,
                "diff_ci95": None if self.diff_ci95 is None else [round(v, digits) for v in self.diff_ci95], "queries": self.n}


def paired_test(a: Sequence[float], b: Sequence[float], *, seed: int, alpha: float = ALPHA, n_resamples: int = N_PERMUTATIONS) -> PairedTest:
    """System A's per-query values against system B's on the same queries (see the module doc)."""
    from scipy import stats

    x, y = _vector(a, "paired_test a"), _vector(b, "paired_test b")
    if x.shape != y.shape:
        raise ConfigError(f"paired_test: the two systems have {x.size} and {y.size} per-query values; a paired test needs the same queries")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    d = x - y
    diff = float(d.mean()) if d.size else 0.0
    if d.size < 2:
        return PairedTest(diff, None, False, None, int(d.size))
    if np.all(d == 0):
        return PairedTest(0.0, 1.0, False, (0.0, 0.0), int(d.size))

    def mean_diff(u: np.ndarray, v: np.ndarray, axis: int) -> np.ndarray:
        return np.mean(u - v, axis=axis)

    res = stats.permutation_test((x, y), mean_diff, permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                                 alternative="two-sided", random_state=np.random.default_rng(seed))
    p = float(min(max(res.pvalue, 0.0), 1.0))
    return PairedTest(diff, p, p < alpha, bootstrap_ci(d, seed=seed + 1), int(d.size))


__all__ = ["ALPHA", "CI_METHOD", "CONFIDENCE", "N_PERMUTATIONS", "N_RESAMPLES", "PairedTest", "STAT_METRICS", "TEST_METHOD", "bootstrap_ci", "derive_seed",
           "paired_test"]
