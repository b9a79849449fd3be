"""Model inputs of the fusion ranker: pure numpy builders (no torch, no I/O) plus a lazy torch converter.

One request (a query, its N candidates, the user's profile) becomes a :class:`RequestFeatures`:

* ``query`` (Dt,): the query text vector;
* ``cand_text`` (N, Dt) + ``cand_text_mask``; ``cand_image`` (N, Da) + ``cand_image_mask``: the
  candidate's text vector and its *aligned* image vector (``Alignment.project`` of the raw
  ``image_vec``; Da = Dt), masked when the product has no photo;
* ``first_stage`` (N, F): :func:`first_stage_inputs` of the retrieval signals (per list: log-scaled
  score, per-query normalized score, reciprocal rank, missing flag; then lists present / lists), and,
  when the spec has ``colour``, the :data:`rerank.model.colour.COLOUR_FEATURES` (query colour against the
  photo's colour as the colour head reads it, and against the colour field);
  then, when the spec has ``attributes``, the :data:`rerank.model.attribute_match.ATTRIBUTE_MATCH_FEATURES` (per
  attribute the query names: does the product's catalog value, or its photo-completed one, agree);
* ``cats`` (N, C) int64: hashed buckets of the product's categorical fields (0 = missing);
* ``hist_text`` (K, Dt) / ``hist_image`` (K, Da) with masks, ``hist_event`` (K,) int (event type index + 1,
  0 = padding), ``hist_age`` (K,) ``log1p(age in days)``, ``hist_mask`` (K,): the user's last K products;
  ``hist_cats`` (K, C) int64: the history products' categorical buckets, hashed as ``cats`` (0 = missing or
  unknown: a profile that carries no attributes), which the ranker compares with each candidate's
  (:func:`rerank.model.ranker.history_agreement`). A user without history has ``hist_mask`` all False.

Masks are explicit: a masked row holds zeros *and* a False mask, and the model excludes it (it never
reads a masked value). :func:`collate` pads a list of requests to ``(B, N_max, ...)`` with a candidate
mask, for training batches and micro-batching.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.errors import ConfigError, DimensionError
from rerank.retrieval.signals import PER_LIST, first_stage_features
from rerank.retrieval.retriever import BM25, LISTS, Candidate

#: categorical product fields hashed into the product embedding (fields absent from a catalog stay 0)
CAT_FIELDS: tuple[str, ...] = (F.ARTICLE_TYPE, F.COLOUR, F.GENDER, F.USAGE, F.CATEGORY, F.BRAND)
#: event types of rerank.history (index + 1 is the id; 0 is padding)
EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
SECONDS_PER_DAY = 86_400.0

ImageProject = Callable[[np.ndarray], np.ndarray]
#: a projection that also gets the products' ids, row for row (:class:`rerank.model.alignment.AlignedCache`)
KeyedImageProject = Callable[[Sequence[str], np.ndarray], np.ndarray]
#: a document key holding the colour head's probabilities of the product's photo, computed ahead (training
#: projects every photo once and replaces the raw ``image_vec`` the head would read)
PHOTO_COLOUR = "_photo_colour"


@dataclass(frozen=True)
class FeatureSpec:
    """What the feature builder produces; stored in the model artifact so serving builds the same."""

    lists: tuple[str, ...] = LISTS
    cat_fields: tuple[str, ...] = CAT_FIELDS
    hash_buckets: int = 4096
    history_k: int = 20
    colour: bool = False  # the colour inputs of rerank.model.colour follow the first-stage signals (the model carries the colour head)
    #: sources of the query-to-attribute agreement inputs (rerank.model.attribute_match; read with the model's intent block):
    #: ("catalog", "photo"), ("catalog",) for the no-image ablation, () none (artifacts trained before them)
    attributes: tuple[str, ...] = ()
    behaviour: bool = False  # rerank.model.behaviour's columns follow the first-stage signals (before the colour ones)
    #: the behaviour product columns' scope (rerank.model.behaviour.PRODUCT_SCOPES): "all" (artifacts trained before it) or
    #: "other_queries" (the request's own query left out)
    behaviour_product_scope: str = "all"

    def __post_init__(self) -> None:
        bad = [l for l in self.lists if l not in LISTS]
        if bad:
            raise ConfigError(f"unknown retrieval lists {bad}; valid: {', '.join(LISTS)}")
        if self.hash_buckets < 2 or self.history_k < 1:
            raise ConfigError(f"hash_buckets must be >= 2 and history_k >= 1, got {self.hash_buckets}, {self.history_k}")
        object.__setattr__(self, "lists", tuple(self.lists))
        object.__setattr__(self, "cat_fields", tuple(self.cat_fields))
        from rerank.model.behaviour import check_product_scope

        check_product_scope(self.behaviour_product_scope)
        if self.attributes:
            from rerank.model.attribute_match import check_sources

            object.__setattr__(self, "attributes", check_sources(self.attributes))

    @property
    def first_stage_dim(self) -> int:
        from rerank.model.colour import COLOUR_FEATURES

        from rerank.model.behaviour import BEHAVIOUR_FEATURES

        n = len(self.lists) * len(PER_LIST) + 1 + (len(COLOUR_FEATURES) if self.colour else 0) + (len(BEHAVIOUR_FEATURES) if self.behaviour else 0)
        if self.attributes:
            from rerank.model.attribute_match import ATTRIBUTE_MATCH_FEATURES

            n += len(ATTRIBUTE_MATCH_FEATURES)
        return n

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


@dataclass(frozen=True, eq=False)
class RequestFeatures:
    """One request's model inputs (see the module doc); ``ids`` are the candidate ids in row order."""

    ids: tuple[str, ...]
    query: np.ndarray
    cand_text: np.ndarray
    cand_text_mask: np.ndarray
    cand_image: np.ndarray
    cand_image_mask: np.ndarray
    first_stage: np.ndarray
    cats: np.ndarray
    hist_text: np.ndarray
    hist_text_mask: np.ndarray
    hist_image: np.ndarray
    hist_image_mask: np.ndarray
    hist_event: np.ndarray
    hist_age: np.ndarray
    hist_mask: np.ndarray
    hist_ids: tuple[str, ...] = ()
    hist_cats: np.ndarray | None = None  # (K, C); None: unknown (all 0), filled in by __post_init__

    def __post_init__(self) -> None:
        if self.hist_cats is None:
            object.__setattr__(self, "hist_cats", np.zeros((len(self.hist_mask), self.cats.shape[1]), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)


ARRAY_FIELDS = tuple(f.name for f in fields(RequestFeatures) if f.name not in ("ids", "hist_ids"))
CANDIDATE_FIELDS = ("cand_text", "cand_text_mask", "cand_image", "cand_image_mask", "first_stage", "cats")
HISTORY_FIELDS = ("hist_text", "hist_text_mask", "hist_image", "hist_image_mask", "hist_event", "hist_age", "hist_mask", "hist_cats")


# --------------------------------------------------------------------------- pieces (pure)
def first_stage_inputs(candidates: Sequence[Candidate], lists: Sequence[str] = LISTS) -> np.ndarray:
    """:func:`rerank.retrieval.signals.first_stage_features`, scaled for a neural net: BM25's raw score as
    ``log1p``, lists present as a fraction. Missing values stay 0 with their ``_missing`` flag set."""
    x = first_stage_features(candidates, lists)
    for j, name in enumerate(lists):
        col = j * len(PER_LIST)
        if name == BM25:
            x[:, col] = np.log1p(np.maximum(x[:, col], 0.0))
    x[:, -1] = x[:, -1] / max(len(lists), 1)
    return x.astype(np.float32)


@functools.lru_cache(maxsize=65_536)
def _bucket(field_name: str, value: str, buckets: int) -> int:
    """Bucket id of one categorical value: pure, so memoized (a catalog has few distinct values per field;
    hashing them for every candidate of every request was a measurable part of the rerank call)."""
    h = hashlib.blake2b(f"{field_name}={value.strip().lower()}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(h, "little") % (buckets - 1)


def hash_categories(docs: Sequence[Mapping[str, Any] | None], spec: FeatureSpec) -> np.ndarray:
    """``(n, len(spec.cat_fields))`` bucket ids (1..buckets-1) of each product's categorical values; 0 = missing."""
    buckets, names = spec.hash_buckets, spec.cat_fields
    blank = (None,) * len(names)
    rows = []
    for d in docs:
        if not d:
            rows.append(_bucket_row(names, blank, blank, buckets))
            continue
        values = tuple(map(d.get, names))
        try:  # keyed by the values and their types (1, 1.0 and True are equal keys but hash as different strings)
            rows.append(_bucket_row(names, values, tuple(map(type, values)), buckets))
        except TypeError:  # an unhashable value (a list): not memoized
            rows.append(_bucket_row.__wrapped__(names, values, (), buckets))
    return np.array(rows, dtype=np.int64).reshape(len(docs), len(names))


@functools.lru_cache(maxsize=65_536)
def _bucket_row(names: tuple[str, ...], values: tuple[Any, ...], types: tuple[type, ...], buckets: int) -> tuple[int, ...]:
    """One product's bucket ids, memoized by its values (a catalog has few distinct combinations); 0 = missing
    or blank. ``types`` is part of the key only."""
    return tuple(0 if v is None or (isinstance(v, str) and not v.strip()) else _bucket(name, str(v), buckets) for name, v in zip(names, values))


def _vec_rows(values: Sequence[Any], dim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(len(values), dim)`` float32 rows and their mask: None or a non-finite vector -> a zero row, False.

    Rows may be lists of floats (JSON sources) or numpy arrays (``LocalEngine.get_arrays``, profiles); the
    finiteness check and the copy run once over all rows instead of once per row."""
    out = np.zeros((len(values), dim), dtype=np.float32)
    mask = np.zeros(len(values), dtype=bool)
    idx = [i for i, v in enumerate(values) if v is not None]
    if not idx:
        return out, mask
    try:  # one conversion of all rows (numpy rows or lists of floats); the row-by-row path below names a bad row
        mat = np.asarray([values[i] for i in idx], dtype=np.float32)
    except (ValueError, TypeError):
        mat = None
    if mat is None or mat.shape != (len(idx), dim):
        rows = []
        for i in idx:
            a = np.asarray(values[i], dtype=np.float32).reshape(-1)
            if a.shape[0] != dim:
                raise DimensionError(f"{what} of row {i} has dimension {a.shape[0]}, expected {dim}")
            rows.append(a)
        mat = np.stack(rows)
    ok = np.isfinite(mat).all(axis=1)  # a non-finite vector is treated as missing (masked), never fed to the model
    at = np.asarray(idx, dtype=np.intp)[ok]
    out[at] = mat[ok]
    mask[at] = True
    return out, mask


def _project(raw: np.ndarray, mask: np.ndarray, ids: Sequence[str], project: ImageProject | None, cache: KeyedImageProject | None,
             out_dim: int) -> np.ndarray:
    aligned = np.zeros((len(raw), out_dim), dtype=np.float32)
    if not mask.any():
        return aligned
    if cache is not None:
        aligned[mask] = cache([i for i, m in zip(ids, mask) if m], raw[mask])
    elif project is not None:
        aligned[mask] = np.asarray(project(raw[mask]), dtype=np.float32)
    return aligned


@dataclass(frozen=True)
class HistoryInput:
    """The history part of a request, from a :class:`rerank.history.UserProfile` or built by hand.

    ``text`` / ``image`` rows may be None (missing vector); ``events`` are event type names; ``ages_s`` seconds;
    ``attributes``: each product's document with its categorical fields (``FeatureSpec.cat_fields``), or None where
    unknown (a profile carries vectors only: the rerank call fetches these fields for a model that reads them)."""

    product_ids: tuple[str, ...] = ()
    text: tuple[Any, ...] = ()
    image: tuple[Any, ...] = ()
    events: tuple[str, ...] = ()
    ages_s: tuple[float, ...] = ()
    attributes: tuple[Mapping[str, Any] | None, ...] = ()

    def with_attributes(self, docs: Mapping[str, Mapping[str, Any] | None]) -> "HistoryInput":
        """A copy whose ``attributes`` are ``docs[product id]`` (None for a product not in ``docs``)."""
        return replace(self, attributes=tuple(docs.get(p) for p in self.product_ids))

    @classmethod
    def from_profile(cls, profile: Any) -> "HistoryInput":
        if profile is None or not len(profile.items):
            return cls()
        return cls(
            tuple(i.product_id for i in profile.items),
            tuple(profile.text_vecs[r] if profile.text_mask[r] else None for r in range(len(profile.items))),
            tuple(profile.image_vecs[r] if profile.image_mask[r] else None for r in range(len(profile.items))),
            tuple(i.event for i in profile.items),
            tuple(float(i.age_s) for i in profile.items),
        )


def history_arrays(history: HistoryInput | None, spec: FeatureSpec, *, text_dim: int, image_dim: int, project: ImageProject | None, aligned_dim: int,
                   aligned_cache: KeyedImageProject | None = None) -> dict[str, Any]:
    """The ``hist_*`` arrays (K = spec.history_k rows; the newest K items, padding masked)."""
    k = spec.history_k
    h = history or HistoryInput()
    n = min(len(h.product_ids), k)
    text, tmask = _vec_rows(list(h.text[:n]) + [None] * (k - n), text_dim, "history text vector")
    raw, imask = _vec_rows(list(h.image[:n]) + [None] * (k - n), image_dim, "history image vector")
    if project is None and aligned_cache is None:
        imask[:] = False
    image = _project(raw, imask, h.product_ids[:n], project, aligned_cache, aligned_dim)
    event = np.zeros(k, dtype=np.int64)
    age = np.zeros(k, dtype=np.float32)
    for i in range(n):
        ev = h.events[i] if i < len(h.events) else None
        event[i] = EVENT_TYPES.index(ev) + 1 if ev in EVENT_TYPES else 0
        age[i] = math.log1p(max(float(h.ages_s[i]) if i < len(h.ages_s) else 0.0, 0.0) / SECONDS_PER_DAY)
    mask = (tmask | imask) & (np.arange(k) < n)
    attrs = list(h.attributes[:n]) + [None] * (k - len(h.attributes[:n]))
    cats = np.where(mask[:, None], hash_categories(attrs, spec), 0)
    return {
        "hist_text": text,
        "hist_text_mask": tmask & mask,
        "hist_image": image,
        "hist_image_mask": imask & mask,
        "hist_event": np.where(mask, event, 0),
        "hist_age": np.where(mask, age, 0.0).astype(np.float32),
        "hist_mask": mask,
        "hist_ids": tuple(h.product_ids[:n]),
        "hist_cats": cats.astype(np.int64),
    }


@dataclass(frozen=True, eq=False)
class PreparedRequest:
    """What a request's features hold before the query vector is known (:func:`prepare_request_features`):
    everything but the ``query`` row and the colour columns that read the query; :meth:`finish` adds them.

    The rerank call builds this while the query is still being encoded on another thread."""

    text_dim: int
    parts: Mapping[str, Any]  # the RequestFeatures fields except ``query`` (first_stage without the colour columns)
    colour: Any | None = None  # the colour head, when the spec has colour inputs
    photo_probs: np.ndarray | None = None
    photo_mask: np.ndarray | None = None
    colour_values: tuple[Any, ...] = ()
    intent: Any | None = None  # the intent model, when the spec has attribute agreement inputs
    attribute_values: Any | None = None  # rerank.model.attribute_match.ProductValues of the candidates

    def finish(self, query_vec: np.ndarray) -> RequestFeatures:
        q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.text_dim:
            raise DimensionError(f"query vector has dimension {q.shape[0]}, expected {self.text_dim}")
        parts = dict(self.parts)
        if self.colour is not None:
            parts["first_stage"] = np.hstack([parts["first_stage"], self.colour.features(q, self.photo_probs, self.photo_mask, self.colour_values)])
        if self.attribute_values is not None:
            from rerank.model.attribute_match import match_features

            parts["first_stage"] = np.hstack([parts["first_stage"], match_features(self.intent, q, self.attribute_values)])
        return RequestFeatures(query=q, **parts)


def prepare_request_features(
    candidates: Sequence[Candidate],
    docs: Mapping[str, Mapping[str, Any] | None],
    spec: FeatureSpec,
    *,
    text_dim: int,
    history: HistoryInput | None = None,
    project: ImageProject | None = None,
    aligned_cache: KeyedImageProject | None = None,
    image_dim: int | None = None,
    colour: Any | None = None,
    intent: Any | None = None,
    behaviour: np.ndarray | None = None,
) -> PreparedRequest:
    """The query-independent part of :func:`build_request_features` (the same arguments, ``text_dim`` required);
    ``.finish(query_vec)`` gives the :class:`RequestFeatures`."""
    dt = int(text_dim)
    ids = tuple(c.id for c in candidates)
    dl = [docs.get(i) for i in ids]
    text, tmask = _vec_rows([d.get(F.TEXT_VEC) if d else None for d in dl], dt, F.TEXT_VEC)
    raw_img = [d.get(F.IMAGE_VEC) if d else None for d in dl]
    di = image_dim or next((len(v) for v in raw_img if v is not None), 1)
    raw, imask = _vec_rows(raw_img, di, F.IMAGE_VEC)
    if project is None and aligned_cache is None:
        imask[:] = False
    image = _project(raw, imask, ids, project, aligned_cache, dt)
    hist = history_arrays(history, spec, text_dim=dt, image_dim=di, project=project, aligned_dim=dt, aligned_cache=aligned_cache)
    first = first_stage_inputs(candidates, spec.lists)
    if spec.behaviour:
        first = np.hstack([first, behaviour_columns(behaviour, len(ids))])
    parts = dict(ids=ids, cand_text=text, cand_text_mask=tmask, cand_image=image, cand_image_mask=imask,
                 first_stage=first, cats=hash_categories(dl, spec), **hist)
    extra: dict[str, Any] = {}
    if spec.attributes:
        if intent is None:
            raise ConfigError("the feature spec has attribute agreement inputs but no intent model was given (the model artifact carries it)")
        from rerank.model.attribute_match import product_values

        extra = dict(intent=intent, attribute_values=product_values(intent, dl, spec.attributes))
    if not spec.colour:
        return PreparedRequest(dt, parts, **extra)
    probs, pmask = photo_colours(dl, raw, imask, colour)
    return PreparedRequest(dt, parts, colour, probs, pmask, tuple(d.get(F.COLOUR) if d else None for d in dl), **extra)


def build_request_features(
    query_vec: np.ndarray,
    candidates: Sequence[Candidate],
    docs: Mapping[str, Mapping[str, Any] | None],
    spec: FeatureSpec,
    *,
    history: HistoryInput | None = None,
    project: ImageProject | None = None,
    aligned_cache: KeyedImageProject | None = None,
    text_dim: int | None = None,
    image_dim: int | None = None,
    colour: Any | None = None,
    intent: Any | None = None,
    behaviour: np.ndarray | None = None,
) -> RequestFeatures:
    """Features of one request from its candidates (with first-stage signals) and their documents.

    ``docs[id]`` holds ``text_vec`` / ``image_vec`` (raw, as indexed) and the categorical fields; a
    missing document or vector is masked. ``project`` maps raw image vectors into the text space (the
    alignment); ``aligned_cache`` (a :class:`rerank.model.alignment.AlignedCache` around that projection, called
    with the product ids of the candidates and of the history items) is used instead of it when given.
    Without either, every image is masked. ``colour`` (a :class:`rerank.model.colour.ColourModel`) is needed
    when ``spec.colour``: it reads the raw photos (or ``docs[id][PHOTO_COLOUR]`` when given) and the colour
    fields. ``intent`` (a :class:`rerank.model.intent.IntentModel`) is needed when ``spec.attributes``: the
    query-to-attribute agreement columns (:mod:`rerank.model.attribute_match`) read the documents' attribute fields
    (and, with the ``photo`` source, the photo-completed ones of ``products-v4``). ``behaviour`` (``(n, B)`` rows of
    :meth:`rerank.model.behaviour.BehaviourStats.features`) is read when ``spec.behaviour`` (None: the neutral
    zeros). The same as ``prepare_request_features(...).finish(query_vec)``."""
    q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
    return prepare_request_features(candidates, docs, spec, text_dim=int(text_dim or q.shape[0]), history=history, project=project,
                                    aligned_cache=aligned_cache, image_dim=image_dim, colour=colour, intent=intent, behaviour=behaviour).finish(q)


def behaviour_columns(behaviour: np.ndarray | None, n: int) -> np.ndarray:
    """The behaviour columns of ``n`` candidates (:meth:`rerank.model.behaviour.BehaviourStats.features`): the given
    ``(n, B)`` rows, or the neutral zeros when None (no statistics: the model serves as for a query without history)."""
    from rerank.model.behaviour import BEHAVIOUR_FEATURES, neutral

    if behaviour is None:
        return neutral(n)
    b = np.asarray(behaviour, dtype=np.float32)
    if b.shape != (n, len(BEHAVIOUR_FEATURES)):
        raise DimensionError(f"behaviour columns have shape {b.shape}, expected {(n, len(BEHAVIOUR_FEATURES))}")
    return np.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)


def photo_colours(docs: Sequence[Mapping[str, Any] | None], raw_image: np.ndarray, image_mask: np.ndarray,
                  colour: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """The colour head's probabilities of each photo (``raw_image`` rows where ``image_mask``; a document's
    precomputed ``PHOTO_COLOUR`` wins) and the mask of the photos it read: the query-independent half of the
    colour columns (:meth:`rerank.model.colour.ColourModel.features` reads the query)."""
    if colour is None:
        raise ConfigError("the feature spec has colour inputs but no colour head was given (the model artifact carries it)")
    n = len(docs)
    probs = np.zeros((n, len(colour.names)), dtype=np.float32)
    mask = np.asarray(image_mask, dtype=bool).copy()
    given = [i for i, d in enumerate(docs) if d and PHOTO_COLOUR in d and mask[i] and d[PHOTO_COLOUR] is not None]
    if given:
        probs[given] = np.stack([np.asarray(docs[i][PHOTO_COLOUR], dtype=np.float32) for i in given])
        done = set(given)
        rest = [int(i) for i in np.flatnonzero(mask) if i not in done]
    else:  # serving: no precomputed probabilities, every photo is read
        rest = np.flatnonzero(mask)
    if len(rest):
        every = len(rest) == n  # serving: every row has a photo, so the rows are read in place (no copy)
        sub = docs if every else [docs[i] for i in rest]
        parts, ok = colour_input_parts(sub, raw_image if every else raw_image[rest], colour.inputs)
        mask[rest] = ok  # a photo without every input the head reads (no descriptor, a projected vector) is not read
        if ok.all():
            probs[rest] = colour.photo_probs_of(parts)
        elif ok.any():
            probs[np.asarray(rest, dtype=np.intp)[ok]] = colour.photo_probs_of([p[ok] for p in parts])
    return probs, mask


def colour_fields(colour: Any | None) -> tuple[str, ...]:
    """The document fields a colour head reads besides the text and image vectors every request fetches."""
    return tuple(f for f in (colour.fields if colour is not None else ()) if f not in (F.TEXT_VEC, F.IMAGE_VEC))


def colour_inputs(docs: Sequence[Mapping[str, Any] | None], raw_image: np.ndarray, colour: Any) -> tuple[np.ndarray, np.ndarray]:
    """The colour head's input rows of ``docs`` (its :attr:`~rerank.model.colour.ColourModel.inputs` concatenated:
    ``image_vec`` from ``raw_image``, the rows of ``docs``; other fields from the documents) and which rows have
    every input (``image_vec`` rows of another dimension, e.g. already projected, count as missing)."""
    parts, ok = colour_input_parts(docs, raw_image, colour.inputs)
    return np.hstack(parts), ok


def colour_input_parts(docs: Sequence[Mapping[str, Any] | None], raw_image: np.ndarray,
                       inputs: Sequence[tuple[str, int]]) -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`colour_inputs` for the ``(field, dim)`` ``inputs`` of a head (trained or to be trained), with one
    ``(n, dim)`` matrix per input instead of their concatenation."""
    parts, ok = [], np.ones(len(docs), dtype=bool)
    for field, dim in inputs:
        if field == F.IMAGE_VEC:
            if raw_image.shape[1] != dim:
                return [np.zeros((len(docs), d), dtype=np.float32) for _, d in inputs], np.zeros(len(docs), dtype=bool)
            parts.append(np.asarray(raw_image, dtype=np.float32))
        else:
            rows, m = _vec_rows([d.get(field) if d else None for d in docs], dim, field)
            parts.append(rows)
            ok &= m
    return parts, ok


def collate(requests: Sequence[RequestFeatures]) -> dict[str, np.ndarray]:
    """Pad requests to a batch: candidate arrays ``(B, N_max, ...)`` with ``cand_mask`` (B, N_max),
    history arrays ``(B, K, ...)``, ``query`` (B, Dt). Pure numpy."""
    if not requests:
        raise ConfigError("collate needs at least one request")
    b = len(requests)
    n = max(max(len(r) for r in requests), 1)
    if b == 1 and len(requests[0]) == n:  # one request, nothing to pad: its arrays with a batch axis (views, no copies)
        r = requests[0]
        one = {name: getattr(r, name)[None] for name in ("query",) + CANDIDATE_FIELDS + HISTORY_FIELDS}
        one["cand_mask"] = np.ones((1, n), dtype=bool)
        return one
    out: dict[str, np.ndarray] = {"query": np.stack([r.query for r in requests])}
    out["cand_mask"] = np.zeros((b, n), dtype=bool)
    for i, r in enumerate(requests):
        out["cand_mask"][i, : len(r)] = True
    for name in CANDIDATE_FIELDS:
        first = getattr(requests[0], name)
        arr = np.zeros((b, n) + first.shape[1:], dtype=first.dtype)
        for i, r in enumerate(requests):
            arr[i, : len(r)] = getattr(r, name)
        out[name] = arr
    for name in HISTORY_FIELDS:
        out[name] = np.stack([getattr(r, name) for r in requests])
    return out


def to_torch(batch: Mapping[str, np.ndarray], device: Any = "cpu") -> dict[str, Any]:
    """The collated arrays as torch tensors on ``device`` (torch imported here, lazily)."""
    from rerank.model.torch_lib import require_torch as _torch

    torch = _torch()
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


__all__ = [
    "ARRAY_FIELDS",
    "CAT_FIELDS",
    "EVENT_TYPES",
    "FeatureSpec",
    "HistoryInput",
    "KeyedImageProject",
    "PHOTO_COLOUR",
    "PreparedRequest",
    "RequestFeatures",
    "behaviour_columns",
    "build_request_features",
    "colour_fields",
    "colour_input_parts",
    "colour_inputs",
    "photo_colours",
    "prepare_request_features",
    "collate",
    "first_stage_inputs",
    "hash_categories",
    "history_arrays",
    "to_torch",
]
