"""Diversity in the rerank: maximal marginal relevance (MMR) over the reranked candidates, pure numpy.

A shopper who types "heels" with no history gets a top 10 of near-identical black pumps: the model has no
reason to prefer one colour or style, so it stacks the most similar products. MMR re-orders the model's
ranking greedily; each next position goes to the candidate maximizing

    (1 - lambda) * relevance_i  -  lambda * max_{j placed above} similarity(i, j)

where ``relevance`` is the model score rescaled per call (:func:`normalize_relevance`: the best 1, the score at the 30% mark 0,
so lambda means the same for every model and query) and ``similarity`` combines the modalities
(:func:`similarity_matrix`): the cosines of the candidates' text vectors, of their *aligned* photo vectors (the
photo projected into the text space by the model's alignment) and, where the model reads them, of their photos'
pixel colour descriptors, weighted by :class:`DiversityConfig` ``text_weight`` / ``image_weight`` /
``colour_weight``; a pair that lacks a modality uses the others; the mean is clipped to [0, 1].

* ``lambda = 0`` is the model's order, exactly (MMR is skipped).
* A candidate without any vector has similarity 0 to every other: it counts as maximally dissimilar, and the
  candidates without vectors keep their relevance order among themselves. Never an error.
* Ties (equal MMR values) go to the candidate ranked higher by relevance (callers pass the candidates in
  relevance order, ties broken by id).
* Cost: only the candidates that can take one of the ``depth`` positions are compared (:func:`eligible`, an exact
  bound: the same order as comparing all of them); with a small lambda (a shopper with history) that is little more
  than the depth, with lambda near 1 all of them. The vectors are read where the caller holds them (``rows``), with
  one matrix product per modality.

``diversity="auto"`` (:func:`choose_lambda`) scales lambda with what the model does not know: the full
``auto_max`` for a vague query (no word that qualifies the product type, e.g. "heels") from a shopper without
history, less for each word that does ("black", "ladies", "formal": :func:`query_qualifiers`),
and less as the shopper's history grows (:func:`history_strength`). The choice says which lambda applied and
why (:class:`LambdaChoice`), for the call's explanation.

Everything here is a pure function of its arguments (no I/O, no torch); :class:`rerank.reranker.Reranker` and
the evaluation harness call the same functions.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.errors import ConfigError

AUTO = "auto"
#: what the range error names (the service's 422 and the library's ConfigError say the same)
ALLOWED = 'a number in [0, 1] or "auto"'
#: weights of the event types of a history (rerank.model.inputs.EVENT_TYPES order) in :func:`history_strength`
EVENT_WEIGHTS: Mapping[str, float] = {"view": 0.25, "click": 0.5, "add_to_cart": 1.0, "purchase": 1.0}
#: catalog fields whose values name a product *type*: query words found in them do not qualify the query
TYPE_FIELDS: tuple[str, ...] = (F.ARTICLE_TYPE, F.CATEGORY)
#: fields whose values a qualifying query word is looked up in, for the explanation
ATTRIBUTE_FIELDS: tuple[str, ...] = (F.COLOUR, F.GENDER, F.USAGE, F.BRAND, F.SEASON)
_STOPWORDS = frozenset({"a", "an", "the", "for", "with", "and", "of", "in", "on", "to", "by", "from", "or", "my"})
#: words that name an attribute even when no candidate carries them as a field value (catalogs spell gender and
#: colour their own way: "ladies" for Women, "gray" for Grey); stemmed as :func:`_words` stems
BUILTIN_ATTRIBUTE_WORDS: Mapping[str, str] = {
    **{w: F.GENDER for w in ("men", "man", "male", "gent", "gentleman", "boy", "women", "woman", "female", "lady", "girl", "kid",
                             "child", "children", "unisex", "her", "him")},
    **{w: F.COLOUR for w in ("black", "white", "grey", "gray", "red", "blue", "navy", "green", "olive", "yellow", "orange", "pink",
                             "purple", "violet", "brown", "beige", "cream", "tan", "maroon", "burgundy", "silver", "gold", "golden",
                             "multi", "multicolour", "multicolor", "khaki", "teal", "turquoise", "magenta", "peach", "lavender",
                             "mustard", "charcoal", "coral", "nude", "crimson", "scarlet", "ivory", "offwhite", "mauve", "rust")},
}
_WORD = re.compile(r"[a-z0-9]+")


def parse_diversity(value: Any, *, what: str = "diversity") -> float | str:
    """``value`` as a diversity setting: a float in [0, 1] (a number or a numeric string) or ``"auto"``.

    Raises :class:`ConfigError` naming the allowed range for anything else (a bool, NaN, 1.5, "high", None)."""
    if isinstance(value, str):
        s = value.strip().lower()
        if s == AUTO:
            return AUTO
        try:
            num = float(s)
        except ValueError:
            raise ConfigError(f"{what} must be {ALLOWED}, got {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{what} must be {ALLOWED}, got {value!r}")
    else:
        num = float(value)
    if not math.isfinite(num) or not 0.0 <= num <= 1.0:
        raise ConfigError(f"{what} must be {ALLOWED}, got {value!r}")
    return num


def diversity_label(value: float | str) -> str:
    """The text form of a parsed diversity (``"auto"``, ``"0"``, ``"0.3"``): keys of ``by_diversity`` reports."""
    return AUTO if value == AUTO else f"{float(value):g}"


@dataclass(frozen=True)
class DiversityConfig:
    """How the diversity step measures similarity and chooses ``auto``'s lambda.

    ``text_weight`` / ``image_weight`` / ``colour_weight``: weights (relative) of the cosines of the text vectors, of
    the aligned photo vectors and of the photos' pixel colour descriptors (``image_colour``, where the index stores
    them and the model reads them) in the similarity; a pair missing one uses the others. ``colour_name_weight``: weight
    of the products' colour *names* agreeing (the catalog's colour, or the one indexing completed from the photo:
    :func:`rerank.model.intent.product_attribute`); 0: not compared. ``auto_max``: the lambda of
    ``auto`` for a vague query from a shopper without history. ``qualifier_weight``: each word qualifying the
    product type divides it by ``1 + qualifier_weight * words``. ``history_scale``: event weight
    (:data:`EVENT_WEIGHTS`) at which the history strength reaches 1 - 1/e. ``depth``: how many positions MMR fills
    when the call does not say (the rerank call's ``top_k``, ``search``'s ``size``); the rest follow in relevance
    order (None: all; each position costs a pass over the candidates). ``pool``: only the best ``pool`` candidates by
    relevance (at least ``depth``) take part; the others follow them in relevance order (None: all; the similarity
    matrix costs the square of it). ``relevance_window``: see :func:`normalize_relevance` (0.3: the
    best score is 1, the score at the 30% mark 0; None: min-max over all the candidates).

    The defaults were chosen on the fashion benchmark's dev simulated shoppers (``docs/benchmarks.md``, *Diversity*):
    min-max relevance over all candidates let MMR pull other product types into a retrieved top 10 (NDCG@10 -0.03 at
    lambda 0.8), the median window kept that to -0.007 and the 30% window to -0.002; the colour descriptors made the
    most of a lambda."""

    text_weight: float = 0.5
    image_weight: float = 0.5
    colour_weight: float = 0.75
    colour_name_weight: float = 2.0
    auto_max: float = 0.9
    qualifier_weight: float = 3.0
    history_scale: float = 2.0
    depth: int | None = 30
    relevance_window: float | None = 0.3
    pool: int | None = None

    def __post_init__(self) -> None:
        for name in ("text_weight", "image_weight", "colour_weight", "colour_name_weight", "qualifier_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"diversity {name} must be a finite number >= 0, got {v!r}")
        if self.text_weight + self.image_weight + self.colour_weight + self.colour_name_weight <= 0:
            raise ConfigError("diversity text_weight, image_weight, colour_weight and colour_name_weight cannot all be 0")
        parse_diversity(self.auto_max, what="diversity auto_max")
        if isinstance(self.history_scale, bool) or not isinstance(self.history_scale, (int, float)) or not self.history_scale > 0:
            raise ConfigError(f"diversity history_scale must be > 0, got {self.history_scale!r}")
        for name in ("depth", "pool"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"diversity {name} must be None or an int >= 1, got {v!r}")
        w = self.relevance_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < w <= 1.0):
            raise ConfigError(f"diversity relevance_window must be None or a fraction in (0, 1], got {w!r}")


# --------------------------------------------------------------------------- similarity
def similarity_matrix(text: Any, text_mask: Any = None, image: Any = None, image_mask: Any = None, *,
                      text_weight: float = 0.5, image_weight: float = 0.5, colour: Any = None, colour_mask: Any = None,
                      colour_weight: float = 0.0, rows: Any = None, colour_names: Sequence[str | None] | None = None,
                      colour_name_weight: float = 0.0) -> np.ndarray:
    """``(m, m)`` similarities in [0, 1] of candidates from their text rows, (aligned) photo rows and, optionally,
    their photos' colour descriptors (``image_colour``) and their colour names (``colour_names``, one per row, None
    where unknown: 1 for the same name, 0 for another; :func:`one_hot`).

    Per pair: the weighted mean of the cosines of the modalities *both* have (``*_mask``: which rows are present; a
    zero or non-finite row counts as absent), 0 when they share none, clipped to [0, 1] (a negative mean counts as
    unrelated). A candidate without any vector is 0 to every other (maximally dissimilar).

    ``rows``: which rows, in which order (e.g. the candidates in relevance order, or the first few of them); None:
    all n in order. The vectors are read where they lie: no reordered copy of all of them is made.

    One matrix product per modality, of its rows scaled by sqrt(weight) / norm (an absent row's scale is 0); the
    pair's total weight is the product of the presence flags, computed only when some row of some modality is
    absent."""
    t = None if text is None else np.asarray(text)
    n = len(t) if t is not None else len(np.asarray(image if image is not None else colour))
    sel = None if rows is None else np.asarray(rows, dtype=np.intp).reshape(-1)
    # all n rows in another order: compute in place and reorder the (n, n) result rather than copy every vector
    permute = sel is not None and len(sel) == n
    take = None if sel is None or permute else sel
    m = n if take is None else len(take)
    s: np.ndarray | None = None
    present: list[tuple[np.ndarray, float]] = []
    partial = False
    names = (None, None) if colour_names is None or not float(colour_name_weight) > 0 else one_hot(colour_names, only=take)
    for rows_, mask, w in ((t, text_mask, text_weight), (image, image_mask, image_weight), (colour, colour_mask, colour_weight),
                           (names[0], names[1], colour_name_weight)):
        if rows_ is None or not float(w) > 0:
            continue
        a = np.asarray(rows_, dtype=np.float32).reshape(n, -1)
        if take is not None:
            a = a[take]
        norms = np.sqrt(np.einsum("ij,ij->i", a, a))
        ok = norms > 0  # False for NaN
        finite = math.isfinite(float(norms.sum()))  # one reduction; a NaN or inf norm makes the sum non-finite
        if not finite:
            ok &= np.isfinite(norms)
        if mask is not None:
            mk = np.asarray(mask, dtype=bool).reshape(n)
            ok &= mk if take is None else mk[take]
        if not ok.any():
            continue
        if not ok.all():
            partial = True
            if not finite:  # absent rows are scaled by 0 below; only a non-finite value needs zeroing (0 * inf is NaN)
                a = np.where(ok[:, None], a, np.float32(0.0))
        # rows scaled by sqrt(weight) / norm (0 where absent): their product is the weighted cosine
        u = np.zeros(m, dtype=np.float32)
        np.divide(np.float32(math.sqrt(float(w))), norms, out=u, where=ok)
        a = a * u[:, None]
        g = a @ a.T
        if s is None:
            s = g
        else:
            s += g
        present.append((ok, float(w)))
    if s is None:
        return np.zeros((m, m), dtype=np.float32)
    if not partial:
        s /= np.float32(sum(w for _, w in present))
    else:
        p = np.stack([ok for ok, _ in present], axis=1).astype(np.float32)
        den = (p * np.float32([w for _, w in present])) @ p.T
        s /= np.where(den > 0, den, np.float32(1.0))
    np.clip(s, 0.0, 1.0, out=s)
    return s[np.ix_(sel, sel)] if permute else s


def document_inputs(docs: Sequence[Mapping[str, Any] | None], config: "DiversityConfig") -> tuple[list[Any] | None, list[str | None] | None]:
    """What the step reads from the candidates' documents besides the model's vectors, per candidate: the photo's
    pixel colour descriptor (``image_colour``) and the colour name (the catalog's, or the one indexing completed from
    the photo: :func:`rerank.model.intent.product_attribute`); each None when the config does not weigh it."""
    colour = [(d or {}).get(F.IMAGE_COLOUR) for d in docs] if config.colour_weight > 0 else None
    names = None
    if config.colour_name_weight > 0:
        from rerank.model.intent import product_attribute

        names = [product_attribute(d, F.COLOUR)[0] for d in docs]
    return colour, names


def one_hot(values: Sequence[Any], *, only: Any = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Names (e.g. colours; None or blank where unknown) as one-hot float32 rows and their presence mask, compared
    without case or surrounding blanks: the cosine of two rows is 1 for the same name, 0 for another. ``only``: the
    indices of the rows to read (the others come out absent); ``(None, all False)`` when no name is present."""
    n = len(values)
    idx = range(n) if only is None else np.asarray(only, dtype=np.intp).reshape(-1).tolist()
    codes: dict[str, int] = {}
    at: list[tuple[int, int]] = []
    for i in idx:
        v = values[i]
        if isinstance(v, str) and v.strip():
            at.append((i, codes.setdefault(v.strip().lower(), len(codes))))
    mask = np.zeros(n, dtype=bool)
    if not at:
        return None, mask
    mat = np.zeros((n, len(codes)), dtype=np.float32)
    r, c = zip(*at)
    mat[list(r), list(c)] = 1.0
    mask[list(r)] = True
    return mat, mask


def stack_rows(values: Sequence[Any], *, only: Any = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Per-candidate vectors (None where absent; lists or arrays) as one float32 matrix and its presence mask;
    ``(None, all False)`` when none is present. Rows of another length than the first present one count as absent.
    ``only``: the indices of the rows to read (the others come out absent: zero, masked), e.g. the candidates the
    diversity step compares."""
    n = len(values)
    idx = range(n) if only is None else np.asarray(only, dtype=np.intp).reshape(-1).tolist()
    sub = values if only is None else [values[i] for i in idx]
    dim = next((len(v) for v in sub if v is not None), 0)
    if not dim:
        return None, np.zeros(n, dtype=bool)
    ok = [v is not None and len(v) == dim for v in sub]
    if only is None and all(ok):
        return np.array(sub, dtype=np.float32), np.ones(n, dtype=bool)  # one pass over equal-length rows (the common case)
    at = [i for i, k in zip(idx, ok) if k]
    mat = np.zeros((n, dim), dtype=np.float32)
    mat[at] = np.array([v for v, k in zip(sub, ok) if k], dtype=np.float32)
    mask = np.zeros(n, dtype=bool)
    mask[at] = True
    return mat, mask


# --------------------------------------------------------------------------- MMR
@dataclass(frozen=True)
class Diversified:
    """The MMR order: ``order[p]`` is the input index placed at position p; ``max_similarity[i]`` the largest
    similarity of input i to the candidates placed above it when it was placed (None beyond ``depth``, where
    candidates follow in relevance order)."""

    order: tuple[int, ...]
    max_similarity: tuple[float | None, ...]


def normalize_relevance(scores: Any, window: float | None = None) -> np.ndarray:
    """Scores onto the scale MMR weighs against similarity: ``(s - s_w) / (s_max - s_w)``, ``s_w`` the score at the
    ``window`` fraction of the candidates by rank (0.5: the median; None: the lowest), so the best is 1, the window's
    edge 0 and those below it negative; all equal: all 1. A window keeps a long tail of poor candidates (whose low
    scores squeeze a plain min-max of the top into a sliver near 1) from weighing as much as the top's own differences."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(s):
        return s
    hi = float(s.max())
    if window is not None:
        k = max(1, math.ceil(window * len(s))) - 1  # the window's edge: the (k+1)-th best score
        lo = float(-np.partition(-s, k)[k])
    else:
        lo = float(s.min())
    if not hi > lo:
        lo = float(s.min())
    return (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)


def mmr(relevance: Any, similarity: np.ndarray, lam: float, *, depth: int | None = None) -> Diversified:
    """Greedy maximal marginal relevance over candidates given **in relevance order** (ties in that order).

    ``relevance``: on the scale weighed against similarity (:func:`normalize_relevance`). ``similarity``: ``(n, n)`` in [0, 1]
    (:func:`similarity_matrix`). ``lam``: 0 keeps the order, 1 ranks by dissimilarity alone after the first.
    ``depth``: positions filled by MMR (None: all); the rest follow in relevance order."""
    lam = float(lam)
    rel = np.asarray(relevance, dtype=np.float64).reshape(-1)
    n = len(rel)
    sim = np.asarray(similarity)
    if sim.shape != (n, n):
        raise ConfigError(f"similarity must be ({n}, {n}) for {n} candidates, got {sim.shape}")
    depth = n if depth is None else max(0, min(int(depth), n))
    if lam <= 0.0 or n <= 1 or depth == 0:
        return Diversified(tuple(range(n)), (None,) * n)
    gain = (1.0 - lam) * rel
    # score_i = gain_i - lam * max_{j placed} sim(i, j) = min(gain_i, min_{j placed} (gain_i - lam * sim(j, i))): each
    # placement lowers the scores to the row of gain - lam * sim (rounding is monotone, so this is exactly the
    # subtraction of the maximum); a placed one is set to -inf. Two numpy calls per position instead of four.
    drop = gain[None, :] - sim.astype(np.float64) * lam
    score = gain.copy()
    order: list[int] = []
    placed_sim: list[float | None] = [None] * n
    for _ in range(depth):
        j = int(score.argmax())
        order.append(j)
        placed_sim[j] = float(gain[j] - score[j]) / lam  # lam * its max similarity to those placed above, over lam
        np.minimum(score, drop[j], out=score)
        score[j] = -np.inf  # placed: never chosen again (a minimum cannot raise it)
    if depth < n:
        taken = set(order)
        order.extend(i for i in range(n) if i not in taken)
    return Diversified(tuple(order), tuple(placed_sim))


def eligible(relevance: np.ndarray, lam: float, depth: int) -> int:
    """How many candidates (a prefix, in the given order) can take one of the first ``depth`` MMR positions; those
    after it follow in relevance order whatever their similarities, so MMR need not see them.

    Exact, from the bounds of the MMR value ``(1 - lam) * rel - lam * max_sim`` with ``max_sim`` in [0, 1]: while
    fewer than ``depth`` are placed, one of the ``depth`` most relevant is still waiting, worth at least
    ``(1 - lam) * rel_depth - lam`` (``rel_depth`` the depth-th largest relevance); a candidate worth at most
    ``(1 - lam) * rel`` below that can never be chosen. The cut is the last candidate that clears
    ``rel_depth - lam / (1 - lam)`` (with a margin for rounding); none for ``lam`` = 1. A vague query from a shopper
    without history (lambda near 1) keeps them all; a small lambda keeps little more than the depth."""
    rel = np.asarray(relevance, dtype=np.float64).reshape(-1)
    n = len(rel)
    lam = float(lam)
    if not 0 < depth < n or lam > 1.0 - 1e-6 or not np.isfinite(rel).all():  # (near) 1: no bound
        return n
    kth = float(np.partition(rel, n - depth)[n - depth])
    thr = kth - lam / (1.0 - lam)
    thr -= 1e-9 * max(1.0, abs(thr))
    ok = np.flatnonzero(rel >= thr)
    return max(int(ok[-1]) + 1, depth)


def diversify(relevance: Any, lam: float, *, text: Any, text_mask: Any = None, image: Any = None, image_mask: Any = None,
              colour: Any = None, colour_mask: Any = None, config: "DiversityConfig | None" = None, depth: int | None = None,
              rows: Any = None, tiers: Any = None, colour_names: Sequence[str | None] | None = None) -> Diversified:
    """:func:`mmr` of the relevance (:func:`normalize_relevance`) with :func:`similarity_matrix` of the candidates'
    vectors, weighted as ``config`` says. ``relevance`` is in relevance order; ``rows``: the vectors' (and masks')
    row of each of those candidates (e.g. the first stage's order the model's inputs are in); None: the vectors
    are in relevance order too. ``colour`` may also be the per-candidate rows (None where absent: the documents'
    ``image_colour`` values): only the compared ones are stacked (:func:`stack_rows`). ``colour_names``: per row,
    the product's colour name (the catalog's, or the one indexing completed from the photo), compared when the
    config's ``colour_name_weight`` is above 0.

    Only the candidates that can take one of the ``depth`` positions (:func:`eligible`, and at most ``pool``) are
    compared: the same order as comparing all, at a fraction of the cost when lambda is small.

    ``tiers``: per candidate (in relevance order, non-decreasing) the query-intent bound's tier
    (:mod:`rerank.model.intent`: 0 for the products the query's type does not contradict). Each tier is diversified
    on its own, its relevance rescaled within it, and fills the positions the tiers above it left: the step never
    lifts a product above one of a better tier, and the bound's offset between tiers does not squeeze the relevance
    of the first tier (a window reaching into a lower tier would make every product of the first tier look equally
    relevant)."""
    cfg = config or DiversityConfig()
    n = len(np.asarray(relevance).reshape(-1))
    depth = depth if depth is not None else cfg.depth
    if tiers is not None and n > 1 and float(lam) > 0.0:
        t = np.asarray(tiers).reshape(-1)
        if len(t) != n:
            raise ConfigError(f"tiers must name one tier per candidate ({n}), got {len(t)}")
        if (np.diff(t) < 0).any():
            raise ConfigError("tiers must be non-decreasing in relevance order (the bound orders by tier first)")
        if t[0] != t[-1]:
            return _diversify_tiers(relevance, lam, t, text=text, text_mask=text_mask, image=image, image_mask=image_mask, colour=colour,
                                    colour_mask=colour_mask, config=cfg, depth=depth, rows=rows, colour_names=colour_names)
    if float(lam) <= 0.0 or n <= 1:
        return mmr(relevance, np.zeros((n, n), dtype=np.float32), 0.0, depth=depth)
    rel = normalize_relevance(relevance, cfg.relevance_window)
    m = n if cfg.pool is None else min(n, max(cfg.pool, depth or 0))
    if depth is not None and 0 < depth < m:
        m = eligible(rel[:m], lam, depth)
    sel = np.arange(n) if rows is None else np.asarray(rows, dtype=np.intp).reshape(-1)
    if len(sel) != n:
        raise ConfigError(f"rows must name one row per candidate ({n}), got {len(sel)}")
    if colour is not None and not isinstance(colour, np.ndarray) and cfg.colour_weight > 0:  # per-candidate rows: stack the compared
        colour, cmask = stack_rows(colour, only=sel[:m])
        colour_mask = cmask if colour_mask is None else cmask & np.asarray(colour_mask, dtype=bool).reshape(-1)
    sim = similarity_matrix(text, text_mask, image, image_mask, text_weight=cfg.text_weight, image_weight=cfg.image_weight,
                            colour=colour, colour_mask=colour_mask, colour_weight=cfg.colour_weight,
                            rows=None if rows is None and m == n else sel[:m], colour_names=colour_names, colour_name_weight=cfg.colour_name_weight)
    d = mmr(rel[:m], sim, lam, depth=depth)
    if m == n:
        return d
    return Diversified(d.order + tuple(range(m, n)), d.max_similarity + (None,) * (n - m))


def _diversify_tiers(relevance: Any, lam: float, tiers: np.ndarray, *, depth: int | None, rows: Any, **vectors: Any) -> Diversified:
    """:func:`diversify` of each tier's run of candidates in turn (see its ``tiers``), each filling what is left of
    ``depth``; the vectors are read at each candidate's row (``rows``) as in one call."""
    rel = np.asarray(relevance, dtype=np.float64).reshape(-1)
    n = len(rel)
    sel = np.arange(n) if rows is None else np.asarray(rows, dtype=np.intp).reshape(-1)
    cuts = [0, *(np.flatnonzero(np.diff(tiers)) + 1).tolist(), n]
    order: list[int] = []
    placed: list[float | None] = [None] * n
    for a, b in zip(cuts, cuts[1:]):
        left = None if depth is None else max(0, depth - len(order))
        if left == 0 or b - a == 1:
            order.extend(range(a, b))
            continue
        d = diversify(rel[a:b], lam, rows=sel[a:b], depth=left, **vectors)
        for k in d.order:
            order.append(a + k)
            placed[a + k] = d.max_similarity[k]
    return Diversified(tuple(order), tuple(placed))


def intra_list_distance(similarity: np.ndarray) -> float:
    """Mean pairwise distance ``1 - similarity`` over the pairs of a list (0 for fewer than two items)."""
    s = np.asarray(similarity, dtype=np.float64)
    n = len(s)
    if n < 2:
        return 0.0
    iu = np.triu_indices(n, k=1)
    return float(np.mean(1.0 - s[iu]))


# --------------------------------------------------------------------------- auto
def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "ch", "sh")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    """Lowercased words, possessives dropped, hyphenated words joined ("t-shirt" -> "tshirt"), stop words out, stemmed."""
    return [_stem(w) for w in _WORD.findall(text.lower().replace("'s", "").replace("-", "")) if w not in _STOPWORDS]


@functools.lru_cache(maxsize=65_536)
def _value_words(value: str) -> tuple[str, ...]:
    """:func:`_words` of a field value, memoized: a catalog repeats its types, colours and brands endlessly."""
    return tuple(_words(value))


def _items(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _field_values(docs: Iterable[Mapping[str, Any] | None], names: Sequence[str]) -> dict[str, str]:
    """The distinct string values of the fields ``names`` over ``docs`` -> the first of ``names`` holding it (a
    value found in two fields names the earlier one, whatever the documents' order)."""
    docs = [d for d in docs if d]
    out: dict[str, str] = {}
    for name in names:
        try:  # one pass of C-level hashing over the documents: a catalog's fields repeat a few values endlessly
            values = dict.fromkeys([d.get(name) for d in docs])
        except TypeError:  # a list value (unhashable): its items
            values = dict.fromkeys(x for d in docs for x in _items(d.get(name)))
        for v in values:
            if isinstance(v, str):
                out.setdefault(v, name)
            elif isinstance(v, tuple):  # a hashable tuple of values
                for x in v:
                    if isinstance(x, str):
                        out.setdefault(x, name)
    return out


@dataclass(frozen=True)
class Qualifiers:
    """The words of a query that qualify the product type (:func:`query_qualifiers`)."""

    words: tuple[str, ...]  # stemmed, in query order
    attributes: Mapping[str, str]  # word -> the field it names (colour, gender, usage, brand, season; "photo" for a query photo)
    type_known: bool  # whether any candidate carried a type field to tell type words from qualifiers


def query_qualifiers(query: str, docs: Iterable[Mapping[str, Any] | None], *, has_image: bool = False) -> Qualifiers:
    """Which words of ``query`` qualify the product type, judged against the candidates' own fields.

    Words are lowercased, possessive and plural endings dropped, stop words skipped. A word found in a candidate's
    type fields (:data:`TYPE_FIELDS`: ``article_type``, ``category``) names the type ("heels", "casual shoes"). Of
    the others, a word that is a value of :data:`ATTRIBUTE_FIELDS` among the candidates (a colour, a gender, a
    usage, a brand, a season) or a common gender or colour word (:data:`BUILTIN_ATTRIBUTE_WORDS`: "ladies", "gray")
    qualifies it. Any other word ("sneakers", "running") counts as another name of the type: a query worded with
    a synonym of the type is still vague. A query photo counts as one qualifier (it shows what is wanted)."""
    words = _words(query)
    docs = list(docs)
    type_words: set[str] = set()
    for v in _field_values(docs, TYPE_FIELDS):
        type_words.update(_value_words(v))
    attr_words: dict[str, str] = {}
    if any(w not in type_words for w in words):
        for v, name in _field_values(docs, ATTRIBUTE_FIELDS).items():
            for w in _value_words(v):
                attr_words.setdefault(w, name)
    seen: set[str] = set()
    quals: list[str] = []
    found: dict[str, str] = {}
    for w in words:
        if w in seen or w in type_words:
            continue
        seen.add(w)
        field = attr_words.get(w) or BUILTIN_ATTRIBUTE_WORDS.get(w)
        if field is not None:
            quals.append(w)
            found[w] = field
    if has_image:
        quals.append("<query photo>")
        found["<query photo>"] = "photo"
    return Qualifiers(tuple(quals), found, bool(type_words))


def history_strength(events: Sequence[str], *, scale: float = 2.0) -> float:
    """How much a shopper's history says, in [0, 1): ``1 - exp(-sum of event weights / scale)``
    (:data:`EVENT_WEIGHTS`: a view 0.25, a click 0.5, a cart or a purchase 1; unknown types 0.25)."""
    total = sum(EVENT_WEIGHTS.get(e, 0.25) for e in events)
    return 1.0 - math.exp(-total / float(scale)) if total > 0 else 0.0


def history_events(hist_event: Any, hist_mask: Any) -> tuple[str, ...]:
    """Event type names of a request's history rows (``RequestFeatures.hist_event``: type index + 1, 0 = padding)."""
    from rerank.model.inputs import EVENT_TYPES

    ev = np.asarray(hist_event).reshape(-1)
    m = np.asarray(hist_mask, dtype=bool).reshape(-1)
    sel = ev[m & (ev >= 1) & (ev <= len(EVENT_TYPES))]
    return tuple(EVENT_TYPES[e - 1] for e in sel.astype(np.int64).tolist())


@dataclass(frozen=True)
class LambdaChoice:
    """The lambda a call applied and why (the explanation's ``diversity`` block)."""

    value: float
    requested: float | str  # the parsed request: a number or "auto"
    source: str  # "request" (the call's argument) or "default" (the reranker's, from the settings)
    reason: str
    qualifiers: tuple[str, ...] = ()
    attributes: Mapping[str, str] | None = None
    history_strength: float | None = None
    history_events: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lambda": self.value, "requested": self.requested, "source": self.source, "reason": self.reason}
        if self.requested == AUTO:
            out.update(qualifiers=list(self.qualifiers), attributes=dict(self.attributes or {}),
                       history_strength=self.history_strength, history_events=self.history_events)
        return out


def choose_lambda(requested: float | str, *, query: str, docs: Iterable[Mapping[str, Any] | None] = (), events: Sequence[str] = (),
                  has_image: bool = False, source: str = "request", config: DiversityConfig | None = None) -> LambdaChoice:
    """The lambda to apply: ``requested`` itself when a number; for ``"auto"``
    ``auto_max / (1 + qualifier_weight * qualifiers) * (1 - history_strength)`` (see the module doc)."""
    cfg = config or DiversityConfig()
    req = parse_diversity(requested)
    if req != AUTO:
        lam = float(req)
        why = "off (lambda 0): the model's order" if lam == 0 else f"lambda {lam:g} as requested"
        return LambdaChoice(lam, lam, source, why if source == "request" else f"{why} (the index's default)")
    q = query_qualifiers(query, docs, has_image=has_image)
    h = history_strength(events, scale=cfg.history_scale)
    vague = 1.0 / (1.0 + cfg.qualifier_weight * len(q.words))
    lam = round(float(cfg.auto_max) * vague * (1.0 - h), 4)
    if q.words:
        named = ", ".join(f"{w!r} ({q.attributes[w]})" for w in q.words)
        qpart = f"the query qualifies the product type with {named}"
    else:
        qpart = "vague query (names no attribute beyond the product type)"
    hpart = "no history" if not events else f"history of {len(events)} events (strength {h:.2f})"
    return LambdaChoice(lam, AUTO, source, f"auto: {qpart}, {hpart} -> lambda {lam:g}", q.words, q.attributes, round(h, 4), len(events))


__all__ = [
    "ALLOWED",
    "AUTO",
    "ATTRIBUTE_FIELDS",
    "BUILTIN_ATTRIBUTE_WORDS",
    "Diversified",
    "DiversityConfig",
    "EVENT_WEIGHTS",
    "LambdaChoice",
    "Qualifiers",
    "TYPE_FIELDS",
    "choose_lambda",
    "diversify",
    "diversity_label",
    "document_inputs",
    "eligible",
    "history_events",
    "history_strength",
    "intra_list_distance",
    "mmr",
    "normalize_relevance",
    "one_hot",
    "parse_diversity",
    "query_qualifiers",
    "similarity_matrix",
    "stack_rows",
]
