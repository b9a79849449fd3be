"""Behaviour features the fusion ranker reads: debiased click-through and conversion per (query, product) and
per product, with their counts, from a UBI search log. Pure numpy and JSON (no torch, no I/O beyond
:meth:`BehaviourStats.save` / :meth:`BehaviourStats.load`).

:class:`BehaviourStats` holds, for every (normalised query, product) pair and every product of the log, the
clicks, the *expected examinations* under the position-based model (the sum of ``theta_r`` over the positions
the product was shown at: a product shown at rank 15 was hardly looked at, so its missing clicks say little) and
the conversions (add-to-carts and purchases), plus the number of searches of each query. It is built from the
log's (spam-capped) sessions and the PBM's ``theta`` (:meth:`BehaviourStats.from_sessions`), saved beside the
model artifact (``behaviour.json.gz``) and read at serving with a dictionary lookup per candidate.

:meth:`BehaviourStats.features` gives the ``(n, len(BEHAVIOUR_FEATURES))`` columns appended to the model's
first-stage inputs when ``FeatureSpec.behaviour`` is set:

* ``qd_ctr``: ``log`` of the pair's posterior clicks per examination (``(clicks + k m) / (exams + k)``, ``m`` the
  log's mean, ``k`` = :data:`PRIOR_EXAMS`) over ``m``: 0 without behaviour, > 0 above the average;
* ``qd_log_exams``: ``log1p`` of the pair's expected examinations (how much the estimate is worth);
* ``qd_conv``: the same log ratio for conversions per click;
* ``p_ctr``, ``p_log_exams``, ``p_conv``: the same for the product over every query (the tail's share);
* ``q_log_searches``: ``log1p`` of the query's searches in the log (head or tail).

Every column is 0 where the log has nothing (an unknown query, a product never shown): the neutral value the
model also sees when a model serves without statistics (fail open).

The product columns' scope (``product_scope``, the artifact's ``FeatureSpec.behaviour_product_scope``): ``all`` counts
the product under every query of the log, the request's own included (artifacts trained before the scope existed);
``other_queries`` leaves the request's own query out, for every query, in training and at serving alike. With ``all``, a
training query that reads its own behaviour also finds its own clicks (its labels) in the product columns, which a query
the log never saw cannot; with ``other_queries`` the product columns mean the same for every query, and the query's own
behaviour is in the query columns only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from indexing.errors import ConfigError, ModelArtifactError

BEHAVIOUR_FEATURES: tuple[str, ...] = ("qd_ctr", "qd_log_exams", "qd_conv", "p_ctr", "p_log_exams", "p_conv", "q_log_searches")
#: pseudo examinations (clicks) of the prior that pulls rarely examined pairs towards the log's mean
PRIOR_EXAMS = 5.0
BEHAVIOUR_FILE = "behaviour.json.gz"
#: the product columns' scope (module doc): every query of the log, or every query but the request's own
PRODUCT_SCOPES: tuple[str, ...] = ("all", "other_queries")
FORMAT = 1
_EPS = 1e-9


def check_product_scope(scope: str) -> None:
    """Refuse a ``behaviour_product_scope`` setting (an artifact's ``FeatureSpec``, a ``TrainConfig``) outside
    :data:`PRODUCT_SCOPES`."""
    if scope not in PRODUCT_SCOPES:
        raise ConfigError(f"unknown behaviour_product_scope {scope!r}; valid: {', '.join(PRODUCT_SCOPES)}")


def normalize_query(text: str) -> str:
    """The query key of the statistics (lower case, single spaces), as :func:`rerank.datasets.clicks.normalize_query`."""
    return " ".join(str(text).lower().split())


@dataclass
class BehaviourStats:
    """Counts per (query, product) and per product: ``[clicks, expected examinations, conversions]``."""

    pairs: dict[tuple[str, str], tuple[float, float, float]] = field(default_factory=dict)
    products: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    searches: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_sessions(cls, sessions: Iterable[Any], theta: Sequence[float] | np.ndarray, **info: Any) -> "BehaviourStats":
        """From click-model sessions (:class:`rerank.datasets.clicks.Session`: ``query``, ``shown``, ``clicks``,
        ``conversions``) and the PBM's examination probability per rank ``theta`` (the last value serves deeper ranks)."""
        th = np.asarray(theta, dtype=np.float64).reshape(-1)
        if th.size == 0 or not np.all(np.isfinite(th)):
            raise ValueError("theta must be a non-empty finite vector")
        pair: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        prod: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        searches: dict[str, int] = defaultdict(int)
        for s in sessions:
            searches[s.query] += 1
            for r, d in enumerate(s.shown):
                e = float(th[min(r, th.size - 1)])
                c = 1.0 if r in s.clicks else 0.0
                v = 1.0 if r in s.conversions else 0.0
                for row in (pair[(s.query, d)], prod[d]):
                    row[0] += c
                    row[1] += e
                    row[2] += v
        out = cls({k: (v[0], v[1], v[2]) for k, v in pair.items()}, {k: (v[0], v[1], v[2]) for k, v in prod.items()}, dict(searches))
        out.info = {"pairs": len(out.pairs), "products": len(out.products), "queries": len(out.searches),
                    "searches": int(sum(out.searches.values())), "theta": [round(float(x), 5) for x in th], **info}
        return out

    @property
    def mean_ctr(self) -> float:
        c = sum(v[0] for v in self.products.values())
        e = sum(v[1] for v in self.products.values())
        return c / e if e > _EPS else 0.0

    @property
    def mean_conv(self) -> float:
        c = sum(v[0] for v in self.products.values())
        v = sum(v[2] for v in self.products.values())
        return v / c if c > _EPS else 0.0

    def _means(self) -> tuple[float, float]:
        cached = self.__dict__.get("_cached_means")
        if cached is None:
            cached = (self.mean_ctr, self.mean_conv)
            self.__dict__["_cached_means"] = cached
        return cached

    # ------------------------------------------------------------------ features
    def features(self, query: str, ids: Sequence[str], *, query_level: bool = True, product_scope: str = "all",
                 without: "BehaviourStats | None" = None) -> np.ndarray:
        """``(len(ids), len(BEHAVIOUR_FEATURES))`` float32 columns for ``query``'s candidates ``ids`` (module doc).

        ``query_level=False`` shows the query as one the log never saw: its columns stay at their neutral 0 and the
        product columns leave this query's own searches out (training shows the model queries without history this
        way, so that it learns the tail's ranking too, from content and from the products' behaviour under *other*
        queries, which is all a new query will have: with its own clicks left in, the product columns would carry
        its labels). ``product_scope`` (:data:`PRODUCT_SCOPES`, module doc): ``other_queries`` leaves the query's own
        searches out of the product columns whatever ``query_level``. ``without``: statistics of some of this query's
        searches (the log's label part, :mod:`rerank.datasets.ubi_judgments`) taken out of every column: the query reads
        its behaviour from its other searches only (training, for a query labelled by that part)."""
        if product_scope not in PRODUCT_SCOPES:
            raise ValueError(f"unknown behaviour product scope {product_scope!r}; valid: {', '.join(PRODUCT_SCOPES)}")
        others = product_scope == "other_queries" or not query_level
        out = np.zeros((len(ids), len(BEHAVIOUR_FEATURES)), dtype=np.float32)
        m, mc = self._means()
        if m <= 0.0:
            return out
        q = normalize_query(query) if query else ""
        n_all = self.searches.get(q, 0)
        n_q = max(0, n_all - without.searches.get(q, 0)) if without is not None else n_all
        k = PRIOR_EXAMS
        for i, d in enumerate(ids):
            qv = self.pairs.get((q, d)) if n_all else None
            wv = without.pairs.get((q, d)) if without is not None and qv is not None else None
            pv = self.products.get(d)
            if wv is not None:  # this query's label-part searches out of the pair and of the product
                qv = _minus(qv, wv)
                pv = _minus(pv, wv) if pv is not None else None
            if qv is not None and query_level and n_q:
                out[i, 0:3] = _ratios(qv, m, mc, k)
            if pv is not None and qv is not None and others:  # the product under every other query
                pv = (pv[0] - qv[0], pv[1] - qv[1], pv[2] - qv[2])
                pv = pv if pv[1] > 1e-6 else None
            if pv is not None:
                out[i, 3:6] = _ratios(pv, m, mc, k)
        if not query_level:
            n_q = 0
        if n_q:
            out[:, 6] = math.log1p(n_q)
        return out

    def keeps_query(self, query: str, share_hidden: float, seed: int | str) -> bool:
        """Whether training shows ``query`` with its own behaviour (``False`` for a seeded ``share_hidden`` of the query
        texts, the same on every run and in every part: the train and validation requests agree)."""
        if share_hidden <= 0.0:
            return True
        h = hashlib.blake2b(f"{seed}:{normalize_query(query)}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0**64 >= share_hidden

    def query_searches(self, query: str) -> int:
        return self.searches.get(normalize_query(query), 0)

    # ------------------------------------------------------------------ storage
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "features": list(BEHAVIOUR_FEATURES), "prior_exams": PRIOR_EXAMS, "info": self.info,
                "searches": self.searches,
                "pairs": [[q, d, round(c, 4), round(e, 4), round(v, 4)] for (q, d), (c, e, v) in self.pairs.items()],
                "products": [[d, round(c, 4), round(e, 4), round(v, 4)] for d, (c, e, v) in self.products.items()]}

    @classmethod
    def from_json(cls, body: Any, *, where: str = "behaviour statistics") -> "BehaviourStats":
        try:
            if body.get("format") != FORMAT:
                raise ModelArtifactError(f"{where}: format {body.get('format')!r}, this version reads {FORMAT}")
            if list(body.get("features", [])) != list(BEHAVIOUR_FEATURES):
                raise ModelArtifactError(f"{where}: features {body.get('features')}, this version builds {list(BEHAVIOUR_FEATURES)}")
            pairs = {(str(q), str(d)): (float(c), float(e), float(v)) for q, d, c, e, v in body["pairs"]}
            products = {str(d): (float(c), float(e), float(v)) for d, c, e, v in body["products"]}
            searches = {str(q): int(n) for q, n in body["searches"].items()}
        except ModelArtifactError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ModelArtifactError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        return cls(pairs, products, searches, dict(body.get("info") or {}))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(self.to_json(), f, separators=(",", ":"))
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "BehaviourStats":
        p = Path(path)
        try:
            with gzip.open(p, "rt", encoding="utf-8") as f:
                body = json.load(f)
        except FileNotFoundError:
            raise ModelArtifactError(f"behaviour statistics not found: {p}") from None
        except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelArtifactError(f"{p}: unreadable behaviour statistics ({type(e).__name__}: {e})") from None
        return cls.from_json(body, where=str(p))


def _minus(a: tuple[float, float, float] | None, b: tuple[float, float, float]) -> tuple[float, float, float] | None:
    """Counts ``a`` less ``b`` (None where nothing was examined is left)."""
    if a is None:
        return None
    out = (max(0.0, a[0] - b[0]), max(0.0, a[1] - b[1]), max(0.0, a[2] - b[2]))
    return out if out[1] > 1e-3 else None  # (the saved counts are rounded to 4 decimals)


def _ratios(row: tuple[float, float, float], m: float, mc: float, k: float) -> tuple[float, float, float]:
    c, e, v = row
    ctr = math.log((c + k * m) / (e + k) / m)
    conv = math.log((v + k * mc) / (c + k) / mc) if mc > 0.0 else 0.0
    return ctr, math.log1p(e), conv


def neutral(n: int) -> np.ndarray:
    """The columns of ``n`` candidates without behaviour (a model that reads them, serving without statistics)."""
    return np.zeros((n, len(BEHAVIOUR_FEATURES)), dtype=np.float32)


__all__ = ["BEHAVIOUR_FEATURES", "BEHAVIOUR_FILE", "BehaviourStats", "PRIOR_EXAMS", "PRODUCT_SCOPES", "check_product_scope", "neutral",
           "normalize_query"]
