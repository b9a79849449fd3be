"""Click models over UBI search logs: sessions, spam capping, a position-based model (EM), a dynamic
Bayesian network (simplified, gamma = 1), held-out log-likelihood, and implicit judgments.

Pure numpy, no I/O. A **session** is one search: the query text, the products shown at positions
1..n (the examined part of the list: the impressions, else the first ``depth`` positions) and the
positions clicked. Sessions are built from validated UBI records (:func:`sessions_from_log`) or from
the history store (:meth:`rerank.history.store.HistoryStore.ubi_sessions`); an event whose query was
never seen (orphaned) or that has no position is not used here.

Models (Chuklin, Markov, de Rijke: *Click Models for Web Search*, 2015):

- ``ctr`` (naive): P(click | q, d) = the (smoothed) click-through rate of the pair, whatever its position;
- ``pbm``: P(click at rank r) = theta_r * alpha_qd, fitted by expectation-maximisation;
- ``sdbn``: the simplified DBN (a cascade-style model): the user scans down, clicks an examined result
  with probability alpha_qd, is satisfied after a click with probability sigma_qd, and stops only when
  satisfied (gamma = 1); fitted in closed form (clicks / examinations up to the last click).

Click spam: one client's clicks count at most once per (query, product) and its sessions count at most
``max_sessions_per_client_query`` times per query (:func:`cap_sessions`); what was capped is counted.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

#: Beta prior (pseudo clicks, pseudo impressions) that pulls rarely shown pairs towards a low attractiveness.
PRIOR_CLICKS, PRIOR_IMPRESSIONS = 1.0, 4.0
EPS = 1e-6
MODELS = ("ctr", "pbm", "sdbn")


def normalize_query(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class Session:
    query: str  # normalised query text
    shown: tuple[str, ...]  # product ids at positions 1..n (examined part)
    clicks: frozenset[int]  # 0-based positions clicked
    client: str | None = None
    query_id: str | None = None
    conversions: frozenset[int] = frozenset()  # 0-based positions with add_to_cart / purchase


@dataclass
class CapStats:
    sessions_in: int = 0
    sessions_capped: int = 0  # sessions of a client beyond the per-(client, query) cap: dropped
    clicks_in: int = 0
    clicks_capped: int = 0  # clicks removed: repeated (client, query, product) clicks, and the dropped sessions' clicks

    def to_dict(self) -> dict[str, int]:
        return {"sessions_in": self.sessions_in, "sessions_capped": self.sessions_capped, "clicks_in": self.clicks_in, "clicks_capped": self.clicks_capped}


def sessions_from_log(queries: Iterable[Any], events: Iterable[Any], *, depth: int | None = None) -> tuple[list[Session], dict[str, int]]:
    """Sessions from validated :class:`~rerank.history.ubi.UbiQuery` / :class:`~rerank.history.ubi.UbiEvent` records.

    The examined list is every shown position (``depth``: the first ``depth`` and any clicked below); clicks
    with a position are mapped onto it (a click whose position disagrees with the shown list, i.e. on
    another product, is ignored and counted). Returns the sessions and counts of what was left out."""
    by_id = {q.query_id: q for q in queries}
    imp: dict[str, int] = defaultdict(int)
    clicks: dict[str, set[int]] = defaultdict(set)
    conv: dict[str, set[int]] = defaultdict(set)
    counts = {"orphaned_events": 0, "events_without_position": 0, "clicks_off_list": 0, "events_without_query_id": 0}
    for e in events:
        if e.query_id is None:
            counts["events_without_query_id"] += 1
            continue
        q = by_id.get(e.query_id)
        if q is None:
            counts["orphaned_events"] += 1
            continue
        if e.position is None:
            counts["events_without_position"] += 1
            continue
        r = e.position - 1
        if e.action == "impression":
            imp[e.query_id] = max(imp[e.query_id], r + 1)
            continue
        if e.action not in ("click", "add_to_cart", "purchase"):
            continue
        if not (0 <= r < len(q.hit_ids)) or (e.object_id is not None and q.hit_ids[r] != e.object_id):
            counts["clicks_off_list"] += 1
            continue
        (clicks if e.action == "click" else conv)[e.query_id].add(r)
    out = []
    for q in by_id.values():
        if not q.hit_ids:
            continue
        # the whole shown list: clicks come from below the impressed first page too, and a list cut at the last
        # click would put deep ranks in only when they were clicked (theta_r then learns nothing but clicks)
        n = len(q.hit_ids) if depth is None else min(len(q.hit_ids), max(depth, max(clicks.get(q.query_id, ()), default=-1) + 1))
        out.append(Session(normalize_query(q.user_query), tuple(q.hit_ids[:n]), frozenset(clicks.get(q.query_id, ())),
                           q.client_id or q.user_id, q.query_id, frozenset(conv.get(q.query_id, ()))))
    return out, counts


def cap_sessions(sessions: Sequence[Session], *, max_sessions_per_client_query: int = 3) -> tuple[list[Session], CapStats]:
    """Spam capping: a client's sessions beyond ``max_sessions_per_client_query`` for the same query are dropped,
    and a (client, query, product) click counts once (later sessions keep the product, unclicked)."""
    st = CapStats()
    per_cq: dict[tuple[str, str], int] = defaultdict(int)
    clicked: set[tuple[str, str, str]] = set()
    out = []
    for s in sessions:
        st.sessions_in += 1
        st.clicks_in += len(s.clicks)
        if s.client is None:
            out.append(s)
            continue
        per_cq[(s.client, s.query)] += 1
        if per_cq[(s.client, s.query)] > max_sessions_per_client_query:
            st.sessions_capped += 1
            st.clicks_capped += len(s.clicks)
            continue
        keep = set()
        for r in s.clicks:
            key = (s.client, s.query, s.shown[r])
            if key in clicked:
                st.clicks_capped += 1
            else:
                clicked.add(key)
                keep.add(r)
        out.append(s if len(keep) == len(s.clicks) else Session(s.query, s.shown, frozenset(keep), s.client, s.query_id, s.conversions))
    return out, st


def split_sessions(sessions: Sequence[Session], *, holdout: float = 0.2, seed: int = 13) -> tuple[list[Session], list[Session]]:
    """A seeded random split of sessions (click prediction on held-out searches of the same queries)."""
    rng = random.Random(seed)
    train, test = [], []
    for s in sessions:
        (test if rng.random() < holdout else train).append(s)
    return train, test


# --------------------------------------------------------------------------- models
@dataclass
class ClickModel:
    name: str
    alpha: dict[tuple[str, str], float]  # attractiveness per (query, product)
    prior_alpha: float
    theta: np.ndarray | None = None  # pbm: examination probability per rank
    sigma: dict[tuple[str, str], float] = field(default_factory=dict)  # sdbn: satisfaction
    prior_sigma: float = 0.5
    impressions: dict[tuple[str, str], int] = field(default_factory=dict)
    exams: dict[tuple[str, str], float] = field(default_factory=dict)  # expected examinations of the pair (pbm: sum of theta_r)
    clicks: dict[tuple[str, str], float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def a(self, q: str, d: str) -> float:
        return self.alpha.get((q, d), self.prior_alpha)

    def relevance(self, q: str, d: str) -> float:
        """The model's judgment of (q, d): attractiveness (ctr, pbm), attractiveness x satisfaction (sdbn)."""
        if self.name == "sdbn":
            return self.a(q, d) * self.sigma.get((q, d), self.prior_sigma)
        return self.a(q, d)

    def click_probs(self, s: Session) -> list[float]:
        """P(C_r = 1 | C_<r) for each shown position (the observed clicks of ``s`` condition later positions)."""
        n = len(s.shown)
        if self.name == "ctr":
            return [self.a(s.query, d) for d in s.shown]
        if self.name == "pbm":
            assert self.theta is not None
            th = [float(self.theta[min(r, len(self.theta) - 1)]) for r in range(n)]
            return [th[r] * self.a(s.query, d) for r, d in enumerate(s.shown)]
        out = []
        e = 1.0  # P(examining this position | clicks so far)
        for r, d in enumerate(s.shown):
            a = self.a(s.query, d)
            p = e * a
            out.append(p)
            if r in s.clicks:
                e = 1.0 - self.sigma.get((s.query, d), self.prior_sigma)
            else:
                e = e * (1.0 - a) / max(1.0 - p, EPS)
        return out


def _pairs(sessions: Sequence[Session]) -> tuple[dict[tuple[str, str], int], np.ndarray, np.ndarray, np.ndarray]:
    index: dict[tuple[str, str], int] = {}
    qd, rank, click = [], [], []
    for s in sessions:
        for r, d in enumerate(s.shown):
            qd.append(index.setdefault((s.query, d), len(index)))
            rank.append(r)
            click.append(1.0 if r in s.clicks else 0.0)
    return index, np.asarray(qd, dtype=np.int64), np.asarray(rank, dtype=np.int64), np.asarray(click, dtype=np.float64)


def fit_ctr(sessions: Sequence[Session]) -> ClickModel:
    index, qd, _rank, click = _pairs(sessions)
    n = np.bincount(qd, minlength=len(index)).astype(np.float64)
    c = np.bincount(qd, weights=click, minlength=len(index))
    alpha = (c + PRIOR_CLICKS) / (n + PRIOR_IMPRESSIONS)
    keys = list(index)
    return ClickModel("ctr", dict(zip(keys, alpha.tolist())), PRIOR_CLICKS / PRIOR_IMPRESSIONS,
                      impressions=dict(zip(keys, n.astype(int).tolist())), exams=dict(zip(keys, n.tolist())), clicks=dict(zip(keys, c.tolist())),
                      info={"pairs": len(keys), "impressions": int(n.sum())})


def fit_pbm(sessions: Sequence[Session], *, iterations: int = 200, tol: float = 1e-8) -> ClickModel:
    """The position-based model by EM; theta is normalised so that theta_1 = 1 is not assumed (it is fitted)."""
    index, qd, rank, click = _pairs(sessions)
    n_pairs, n_ranks = len(index), int(rank.max()) + 1 if len(rank) else 1
    alpha = np.full(n_pairs, 0.2)
    theta = np.linspace(0.9, 0.3, n_ranks)
    n_qd = np.bincount(qd, minlength=n_pairs).astype(np.float64)
    n_r = np.bincount(rank, minlength=n_ranks).astype(np.float64)
    prev = -math.inf
    it = 0
    for it in range(1, iterations + 1):
        a, t = alpha[qd], theta[rank]
        p = np.clip(t * a, EPS, 1 - EPS)
        ll = float(np.sum(click * np.log(p) + (1 - click) * np.log(1 - p)))
        no = 1 - click
        ea = click + no * a * (1 - t) / (1 - p)  # P(attracted | observation)
        ee = click + no * t * (1 - a) / (1 - p)  # P(examined | observation)
        alpha = (np.bincount(qd, weights=ea, minlength=n_pairs) + PRIOR_CLICKS) / (n_qd + PRIOR_IMPRESSIONS)
        theta = np.clip(np.bincount(rank, weights=ee, minlength=n_ranks) / np.maximum(n_r, 1), EPS, 1.0)
        if abs(ll - prev) < tol * max(1.0, abs(ll)):
            break
        prev = ll
    keys = list(index)
    exams = np.bincount(qd, weights=theta[rank], minlength=n_pairs)
    clicks = np.bincount(qd, weights=click, minlength=n_pairs)
    return ClickModel("pbm", dict(zip(keys, alpha.tolist())), PRIOR_CLICKS / PRIOR_IMPRESSIONS, theta=theta,
                      impressions=dict(zip(keys, n_qd.astype(int).tolist())), exams=dict(zip(keys, exams.tolist())), clicks=dict(zip(keys, clicks.tolist())),
                      info={"pairs": n_pairs, "impressions": int(n_qd.sum()), "em_iterations": it, "train_log_likelihood": prev})


def fit_sdbn(sessions: Sequence[Session]) -> ClickModel:
    """Simplified DBN: alpha = clicks / examinations (positions up to the last click, or the whole examined
    list without clicks), sigma = last clicks / clicks."""
    exam: dict[tuple[str, str], float] = defaultdict(float)
    clk: dict[tuple[str, str], float] = defaultdict(float)
    last: dict[tuple[str, str], float] = defaultdict(float)
    for s in sessions:
        lc = max(s.clicks) if s.clicks else len(s.shown) - 1
        for r in range(lc + 1):
            k = (s.query, s.shown[r])
            exam[k] += 1
            if r in s.clicks:
                clk[k] += 1
                if r == lc:
                    last[k] += 1
    alpha = {k: (clk[k] + PRIOR_CLICKS) / (exam[k] + PRIOR_IMPRESSIONS) for k in exam}
    sigma = {k: (last[k] + 1.0) / (clk[k] + 2.0) for k in clk}
    return ClickModel("sdbn", alpha, PRIOR_CLICKS / PRIOR_IMPRESSIONS, sigma=sigma, prior_sigma=0.5,
                      impressions={k: int(v) for k, v in exam.items()}, exams=dict(exam), clicks=dict(clk), info={"pairs": len(alpha)})


def fit(name: str, sessions: Sequence[Session]) -> ClickModel:
    if name == "ctr":
        return fit_ctr(sessions)
    if name == "pbm":
        return fit_pbm(sessions)
    if name == "sdbn":
        return fit_sdbn(sessions)
    from indexing.errors import UnknownNameError

    raise UnknownNameError("click model", name, list(MODELS))


def log_likelihood(model: ClickModel, sessions: Sequence[Session]) -> dict[str, Any]:
    """Mean log-likelihood per shown result (natural log) and perplexity (2^-mean log2 P, per rank and overall)."""
    total, n = 0.0, 0
    by_rank: dict[int, list[float]] = defaultdict(list)
    for s in sessions:
        for r, p in enumerate(model.click_probs(s)):
            p = min(max(p, EPS), 1 - EPS)
            lp = math.log(p) if r in s.clicks else math.log(1 - p)
            total += lp
            n += 1
            by_rank[r].append(lp / math.log(2))
    per_rank = {r + 1: round(2 ** (-float(np.mean(v))), 4) for r, v in sorted(by_rank.items())}
    return {"model": model.name, "log_likelihood": round(total / max(n, 1), 5), "perplexity": round(float(np.mean(list(per_rank.values()))), 4) if per_rank else None,
            "perplexity_by_rank": per_rank, "results": n, "sessions": len(sessions)}


def compare(sessions: Sequence[Session], *, holdout: float = 0.2, seed: int = 13) -> dict[str, Any]:
    """Fit every model on a seeded 80 % of the sessions and score it on the rest."""
    train, test = split_sessions(sessions, holdout=holdout, seed=seed)
    out = {"train_sessions": len(train), "test_sessions": len(test), "models": {}}
    for name in MODELS:
        m = fit(name, train)
        out["models"][name] = log_likelihood(m, test)
        if m.theta is not None:
            out["models"][name]["theta"] = [round(float(x), 4) for x in m.theta]
    return out


def conversion_counts(sessions: Sequence[Session]) -> dict[tuple[str, str], float]:
    """Add-to-carts and purchases per (query, product) (a session counts a product once)."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for s in sessions:
        for r in s.conversions:
            out[(s.query, s.shown[r])] += 1.0
    return dict(out)


def implicit_judgments(model: ClickModel, *, conversions: Mapping[tuple[str, str], float] | None = None, conversion_weight: float = 3.0,
                       min_exams: float = 0.5, prior_strength: float = 1.0, ref_quantile: float = 0.9,
                       max_grade: float = 2.0) -> dict[str, dict[str, float]]:
    """``{query: {product: grade}}`` on the 0..``max_grade`` scale of the fashion qrels.

    A pair is judged only when the model says it was examined enough (expected examinations >=
    ``min_exams``: for ``pbm`` the sum of theta over its impressions, for ``ctr`` the impressions, for
    ``sdbn`` the examinations up to the last click); a product shown only where nobody looks stays
    unjudged (unknown), not irrelevant. Its relevance is the posterior mean of clicks per examination
    (``(clicks + s * m) / (exams + s)``, ``m`` the mean over pairs, ``s`` = ``prior_strength``; ``sdbn``:
    that times its satisfaction probability), and the grade is ``max_grade * min(1, rel / ref)`` with
    ``ref`` the ``ref_quantile`` of every judged pair's relevance: one absolute scale for every query,
    so a tail query's best guess is not promoted to a top grade. With ``conversions`` (add-to-carts and
    purchases per pair), relevance is multiplied by ``1 + conversion_weight * conversions per click``
    (posterior mean, same prior form): a click that leads to a purchase says more than a click."""
    keys = [k for k in model.exams if model.exams[k] >= min_exams]
    if not keys:
        return {}
    tot_c = sum(model.clicks.get(k, 0.0) for k in model.exams)
    tot_e = sum(model.exams.values())
    m = tot_c / max(tot_e, EPS)
    mc = sum(conversions.values()) / max(tot_c, EPS) if conversions else 0.0
    rel = {}
    for k in keys:
        r = (model.clicks.get(k, 0.0) + prior_strength * m) / (model.exams[k] + prior_strength)
        if model.name == "sdbn":
            r *= model.sigma.get(k, model.prior_sigma)
        if conversions is not None:
            r *= 1.0 + conversion_weight * (conversions.get(k, 0.0) + prior_strength * mc) / (model.clicks.get(k, 0.0) + prior_strength)
        rel[k] = r
    ref = float(np.quantile(np.fromiter(rel.values(), dtype=np.float64), ref_quantile))
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (q, d), r in rel.items():
        out[q][d] = round(max_grade * min(1.0, r / max(ref, EPS)), 4)
    return {q: v for q, v in out.items() if any(g > 0 for g in v.values())}


def session_counts(sessions: Sequence[Session]) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for s in sessions:
        c[s.query] += 1
    return dict(c)


__all__ = ["CapStats", "ClickModel", "MODELS", "Session", "cap_sessions", "compare", "fit", "fit_ctr", "fit_pbm", "fit_sdbn",
           "conversion_counts", "implicit_judgments", "log_likelihood", "normalize_query", "session_counts", "sessions_from_log", "split_sessions"]
