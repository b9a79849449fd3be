"""The drop-in rerank call: first-stage hits in, the same shape out, reordered by the fusion model.

``Reranker.rerank(query, hits_or_opensearch_response, *, user_id=None, top_k=None, query_image=None, diversity=None)``

* an OpenSearch response dict -> a **new** dict (the input is not mutated) with ``hits.hits``
  reordered, ``_score`` replaced by the model score, the old score kept as ``_previous_score``, an
  ``_explanation`` per hit, ``hits.max_score`` updated, and a top-level ``"fusionrank"`` block
  (``degraded``: ``None`` or the reason, ``model_version``, ``timings_ms``, ``unknown_ids``: the hits' ids the
  call looked up in the index and did not find, scored from their first-stage signals alone; ``serving``: what the
  artifact serves, the trained model or the safe choice, see below);
* a list of hits (dicts with ``_id``/``_score`` or :class:`indexing.engines.base.Hit`) -> a
  :class:`RankedHits`; iterating it (or ``.items``) gives the same kind of objects as given, reordered
  (dict copies carrying ``_score``/``_previous_score``/``_explanation``; ``Hit`` objects with the new
  score); ``.hits`` gives typed :class:`RankedHit` results and ``.degraded`` the fail-open reason.

What the call can know about the first stage: only the hits it is given. Their input order and
scores are taken as the ``bm25`` list (rank = position, score = ``_score``, min-max normalized within
the given hits); the kNN lists are marked missing. :meth:`Reranker.search` runs the real hybrid
retrieval (:class:`rerank.retrieval.retriever.Retriever`) and passes every list's signals to the model.

``top_k`` keeps the best ``top_k`` hits of the new order (``None``: all). Vectors (and the categorical
fields the model reads) of hits whose ``_source`` lacks them are fetched by id in one ``engine.get``.

Fail open: each call has a time budget (``budget_ms``, default 50). The clock is read after every
stage (encode, fetch, history, features, model); a stage that ran over makes the call return the first-stage
order (torch cannot be interrupted mid-call, so a late model result is discarded). A model or
encoder error, a history-store error (:class:`HistoryError`) or an engine error while fetching
vectors do the same. Degraded calls log a warning and are counted in :attr:`Reranker.stats`
(``{"calls": n, "degraded": n, "degraded:<reason>": n}``). Bad arguments still raise
(:class:`ConfigError` / :class:`TypeError`). ``Reranker.noop(...)`` keeps the first-stage order always:
the baseline and the kill switch.

The query is encoded beside the other stages: the encoder (onnxruntime or torch, both release the GIL while
they compute) runs on a small per-reranker thread pool while the calling thread fetches the candidates' vectors
and reads the user's profile, so on a machine with a core to spare the call costs about the longer of the two
instead of their sum. ``timings_ms["encode"]`` is the encoder's own time; ``"fetch"``, ``"history"`` and
``"features"`` (the model's inputs but the query) run at the same time; ``"model"`` is the rest (the query's
inputs, the forward pass, the explanations). ``overlap_encode=False`` encodes first, on the calling thread.

The forward pass runs on :attr:`Reranker.scorer`: on the CPU by default the ranker's ONNX export on onnxruntime
(:mod:`rerank.model.onnx_ranker`, checked against torch when the reranker is built; ``model_runtime="torch"`` keeps torch).

Diversity (:mod:`rerank.diversity`): after the forward pass, maximal marginal relevance re-orders the scored
candidates by their text vectors, aligned photo vectors (the model's own inputs) and, where fetched for the model's
colour head, their photos' colour descriptors (no further fetch).
``diversity=`` a lambda in [0, 1] or ``"auto"`` (per call; ``None``: the reranker's default, ``Reranker(...,
diversity=...)``, from ``FUSIONRANK_DIVERSITY`` in :func:`workers.composition.build_reranker`); 0 is the model's order. The
stage is timed as ``timings_ms["mmr"]``; the response's ``fusionrank.diversity`` block (``RankedHits.diversity``)
says which lambda applied and why, and each hit's explanation carries ``diversity``: its ``relevance_rank`` (by
the model score) and ``max_similarity`` to the hits placed above it. With a lambda above 0 the hits are no longer
in ``_score`` order: ``_score`` stays the model's relevance. A noop reranker or a call that failed open keeps the
first-stage order (lambda 0, the block says why). A lambda outside [0, 1] raises :class:`ConfigError`.

The safe choice (:mod:`rerank.safe`): when training could not show that the model beats the best first-stage signal
on its validation queries, the artifact says so (``config.json`` ``serving``) and the call serves that signal's order
(``first_stage``: the order the call received; ``bm25``; ``knn_text``: the query-text cosine; ``knn_image``: the
query-photo cosine), computed from the same inputs, without the forward pass. ``fusionrank.serving`` (and
``RankedHits.serving``) says which, and why; each hit's explanation carries ``safe_choice: {signal, score}``.

The query-intent bound (:mod:`rerank.model.intent`; artifacts trained with it carry the catalog's attribute vocabularies):
after the forward pass, a product whose type contradicts the type the query names goes below every product that does
not (``_score`` becomes ``model score - tier * (max - min + 1)``), so the history reorders among the products that
match the query and never lifts one that does not. Each hit's explanation carries ``intent``: its ``tier`` (0: no
contradiction), its ``model_score`` before the bound and, per attribute the query names (type, colour, gender, usage),
the named value, the product's value with its ``source`` and ``confidence``, whether it ``agrees`` (None: unknown) and
whether the attribute ``bounds`` the order. An artifact without the block serves its scores unbounded.

Aligned photos are cached: a candidate's (or history item's) aligned image vector does not depend on the
query, so the reranker keeps the model alignment's output per product in a bounded LRU
(:class:`rerank.model.alignment.AlignedCache`, ``aligned_cache_size`` entries, default 50 000; 0 turns it off),
keyed by the product id and a hash of the raw vector's bytes (a new photo is a new key, never a stale
vector); only the rows it has not seen are projected, in one batch. :attr:`Reranker.aligned_cache` ``.stats``
counts hits and misses.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import abc
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.engines.base import Filters, Hit, array_getter, check_size, copy_json
from indexing.errors import ConfigError, EngineError, FusionRankError, HistoryError
from rerank.model.alignment import DEFAULT_ALIGNED_CACHE_SIZE, AlignedCache
from rerank.diversity import AUTO, DiversityConfig, LambdaChoice, choose_lambda, diversify, document_inputs, history_events, parse_diversity
from rerank.retrieval.fusion import ListSignal
from rerank.limits import check_query_text
from rerank.retrieval.retriever import BM25, LISTS, Candidate, RetrievalConfig, Retriever

log = logging.getLogger(__name__)

DEFAULT_BUDGET_MS = 50.0
#: degraded reasons (the values of ``"fusionrank": {"degraded": ...}`` and ``RankedHits.degraded``)
TIMEOUT, MODEL_ERROR, ENCODER_ERROR, HISTORY_ERROR, ENGINE_ERROR = "timeout", "model_error", "encoder_error", "history_error", "engine_error"
OVERLOADED = "overloaded"  # the micro-batch queue was full
REASONS = (TIMEOUT, MODEL_ERROR, ENCODER_ERROR, HISTORY_ERROR, ENGINE_ERROR, OVERLOADED)


@dataclass(frozen=True)
class RankedHit:
    id: str
    score: float  # the new score (the first-stage score when the call degraded or the reranker is noop)
    rank: int  # 1-based new rank
    previous_score: float
    previous_rank: int
    explanation: Mapping[str, Any]


@dataclass(frozen=True)
class RankedHits:
    """Results of a list call or of :meth:`Reranker.search`; iterating yields ``items`` (the input's kind)."""

    hits: tuple[RankedHit, ...]
    degraded: str | None
    timings: Mapping[str, float]  # ms per stage and "total"
    items: tuple[Any, ...] = ()
    model_version: str | None = None
    #: which diversity lambda applied and why (:meth:`rerank.diversity.LambdaChoice.to_dict`, plus ``applied``)
    diversity: Mapping[str, Any] | None = None
    #: what the artifact serves (:attr:`Reranker.serving`: the model, or the safe choice and why); None for noop
    serving: Mapping[str, Any] | None = None

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.hits]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class _Degrade(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class _Input:
    kind: str  # "opensearch" | "dicts" | "hits"
    ids: list[str]
    scores: list[float]
    sources: list[Mapping[str, Any] | None]
    raw: list[Any] = field(default_factory=list)


def _parse(hits_or_response: Any) -> _Input:
    if isinstance(hits_or_response, Mapping):
        inner = hits_or_response.get("hits")
        if not isinstance(inner, Mapping) or not isinstance(inner.get("hits"), list):
            raise ConfigError("an OpenSearch response must have a hits.hits list; got keys " + ", ".join(map(str, hits_or_response)))
        items, kind = inner["hits"], "opensearch"
    elif isinstance(hits_or_response, (list, tuple)):
        items = list(hits_or_response)
        kind = "hits" if items and isinstance(items[0], Hit) else "dicts"
    else:
        raise TypeError(f"rerank() takes an OpenSearch response dict or a list of hits, got {type(hits_or_response).__name__}")
    ids, scores, sources = [], [], []
    for i, h in enumerate(items):
        if kind == "hits":
            if not isinstance(h, Hit):
                raise TypeError(f"hit {i} is a {type(h).__name__}; a list must hold only Hit objects or only dicts")
            hid, score, src = h.id, h.score, h.source
        else:
            if type(h) is not dict and not isinstance(h, abc.Mapping):  # a plain dict skips the ABC check (per hit)
                raise TypeError(f"hit {i} is a {type(h).__name__}, expected a dict with _id and _score")
            hid, score, src = h.get("_id"), h.get("_score"), h.get("_source")
        if not isinstance(hid, str) or not hid:
            raise ConfigError(f"hit {i} has no string _id/id")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise TypeError(f"hit {hid!r} has a non-numeric score {score!r}")
        ids.append(hid)
        scores.append(float(score) if score is not None and math.isfinite(float(score)) else 0.0)
        sources.append(src if type(src) is dict or isinstance(src, abc.Mapping) else None)
    if len(set(ids)) != len(ids):
        raise ConfigError("duplicate hit ids in the input")
    return _Input(kind, ids, scores, sources, list(items))


def candidates_from_hits(ids: Sequence[str], scores: Sequence[float]) -> tuple[Candidate, ...]:
    """First-stage candidates from an ordered hit list (pure): the list is the ``bm25`` list, rank =
    position, normalized = min-max of the given scores; kNN lists missing."""
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 0.0)
    absent = ListSignal.absent()  # frozen: one shared instance serves every missing list
    out = []
    for r, (i, s) in enumerate(zip(ids, scores), 1):
        norm = (s - lo) / (hi - lo) if hi > lo else 1.0
        sig = {n: absent for n in LISTS}
        sig[BM25] = ListSignal(s, r, norm, False)
        out.append(Candidate(i, s, r, sig))
    return tuple(out)


def history_attribute_fields(model: Any) -> tuple[str, ...]:
    """The categorical fields a model compares between the user's history products and the candidates (its
    ranker's history agreement): ``FeatureSpec.cat_fields``, or none (the model reads no history attributes)."""
    if model is None or not getattr(model.ranker.config, "history_agreement", False):
        return ()
    return tuple(model.feature_spec.cat_fields)


def _memo_key(index: str, names: Sequence[str]) -> tuple[Any, ...]:
    return ("history_attributes", index, tuple(names))


def _memo_attributes(profile: Any, index: str, names: Sequence[str], ids: Sequence[str]) -> dict[str, Any] | None:
    """The categorical fields ``names`` of the history products ``ids`` as an earlier call of this cached profile read
    them (:attr:`rerank.history.UserProfile.memo`), or None where it did not read them all."""
    memo = getattr(profile, "memo", None)
    known = memo.get(_memo_key(index, names)) if memo is not None else None
    if known is None or not all(i in known for i in ids):
        return None
    return {i: known[i] for i in ids if known[i] is not None}


def _has_all(docs: Mapping[str, Any], i: str, names: Sequence[str]) -> bool:
    """Whether the hit ``i``'s document (as the caller gave it) carries every field of ``names``."""
    d = docs.get(i)
    return d is not None and all(n in d for n in names)


def _attribute_needs(ids: Sequence[str], docs: Mapping[str, Any], need: Sequence[str], names: Sequence[str]) -> list[str]:
    """The history products the call must read by id for their categorical fields ``names``: neither a hit the call
    fetches anyway (``need``) nor a hit whose document came with all of them."""
    fetching = set(need)
    return [i for i in dict.fromkeys(ids) if i not in fetching and not _has_all(docs, i, names)]


def _read_attributes(profile: Any, index: str, names: Sequence[str], ids: Sequence[str], docs: Mapping[str, Any],
                     fetched: Mapping[str, Any]) -> dict[str, Any]:
    """The categorical fields of the history products ``ids`` (what the model's history agreement compares with the
    candidates'), from what the call read by id (``fetched``: with :meth:`Reranker.fetch_fields`, so a field is
    missing only where the product lacks it) or a hit's document that has them all; a product the index lacks is
    left out (its agreement counts it as unknown). Kept in the profile's memo, so the next call of a cached profile
    reads nothing for them."""
    have: dict[str, Any] = {}
    for i in ids:
        d = fetched.get(i)
        if d is None and _has_all(docs, i, names):
            d = docs[i]
        if d is not None:
            have[i] = d
    memo = getattr(profile, "memo", None)
    if memo is not None:  # None: the index lacks it
        memo[_memo_key(index, names)] = {i: ({n: have[i][n] for n in names if n in have[i]} if i in have else None) for i in ids}
    return have


def _first_stage_explain(c: Candidate) -> dict[str, Any]:
    return {
        n: {"score": s.score, "rank": s.rank, "normalized": None if s.normalized is None else round(float(s.normalized), 6)}
        for n, s in c.signals.items()
        if not s.missing
    }


class Reranker:
    """The drop-in rerank call over one index (or alias); ``model=None`` is the ``noop`` reranker."""

    def __init__(
        self,
        engine: Any,
        index: str,
        model: Any | None,
        *,
        text_encoder: Any | None,
        image_encoder: Any | None = None,
        history: Any | None = None,
        budget_ms: float = DEFAULT_BUDGET_MS,
        clock: Callable[[], float] = time.perf_counter,
        retrieval: RetrievalConfig | None = None,
        micro_batch: bool | None = None,
        micro_batch_options: Mapping[str, Any] | None = None,
        stands_in_for: str | None = None,
        aligned_cache_size: int = DEFAULT_ALIGNED_CACHE_SIZE,
        overlap_encode: bool = True,
        model_runtime: str = "auto",
        diversity: float | str = 0.0,
        diversity_config: DiversityConfig | None = None,
    ):
        """``stands_in_for``: the model id of the encoder that ``text_encoder`` replaces for queries, once
        :func:`indexing.encoders.check_agreement` showed they agree (an int8 query encoder over a model and an index
        built with the full-precision one; see ``build_reranker`` and ``query_text_backend``).
        ``aligned_cache_size``: entries of the aligned-photo cache (see the module doc; 0: no cache).
        ``overlap_encode``: encode the query on a thread of its own while fetching and reading the profile (see the
        module doc). ``model_runtime``: what runs the forward pass (:func:`rerank.model.onnx_ranker.cpu_runtime`: ``auto``,
        ``torch`` or ``onnx``). ``diversity``: the default lambda of the diversity step (a number in [0, 1] or
        ``"auto"``; 0: off) for calls that pass none; ``diversity_config``: its similarity weights and ``auto``'s
        scale (:class:`rerank.diversity.DiversityConfig`)."""
        if not isinstance(index, str) or not index:
            raise ConfigError("index must be a non-empty string")
        if not (isinstance(budget_ms, (int, float)) and budget_ms > 0):
            raise ConfigError(f"budget_ms must be > 0, got {budget_ms!r}")
        if isinstance(aligned_cache_size, bool) or not isinstance(aligned_cache_size, int) or aligned_cache_size < 0:
            raise ConfigError(f"aligned_cache_size must be an int >= 0, got {aligned_cache_size!r}")
        if model is not None and text_encoder is None:
            raise ConfigError("a fusion model needs the text encoder it was trained with (text_encoder=)")
        if model is not None and text_encoder is not None and getattr(text_encoder, "model_id", None) not in (None, model.text_encoder.model_id) \
                and stands_in_for != model.text_encoder.model_id:
            raise ConfigError(f"text encoder {text_encoder.model_id!r} differs from the model's {model.text_encoder.model_id!r}")
        self.engine, self.index, self.model, self.stands_in_for = engine, index, model, stands_in_for
        self.text_encoder, self.image_encoder, self.history = text_encoder, image_encoder, history
        self.budget_ms, self.clock = float(budget_ms), clock
        self.diversity = parse_diversity(diversity, what="the default diversity")
        if diversity_config is not None and not isinstance(diversity_config, DiversityConfig):
            raise TypeError(f"diversity_config must be a rerank.diversity.DiversityConfig, got {type(diversity_config).__name__}")
        self.diversity_config = diversity_config or DiversityConfig()
        align = model.alignment if model is not None else None
        self.retriever = Retriever(
            engine, index, text_encoder=text_encoder, image_encoder=image_encoder,
            query_to_image_space=align.query_to_image_space if align is not None else None, config=retrieval,
        )
        self._lock = threading.Lock()
        self._stats: dict[str, int] = {"calls": 0, "degraded": 0}
        # per reranker, hence per model: a reloaded model (a new alignment) comes with a new reranker
        self.aligned_cache = AlignedCache(align.project, aligned_cache_size) if align is not None and aligned_cache_size else None
        # threads start on first use; a few, so that concurrent callers do not queue behind one another's queries
        self._encode_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fusionrank-encode") \
            if model is not None and overlap_encode else None
        self.batcher = None
        #: what scores requests: the torch ranker or its ONNX export (rerank.model.onnx_ranker)
        self.scorer = None
        #: what the artifact serves (rerank.safe): the signal of the safe choice, or None when it serves its model
        self._safe_signal = model.serving["signal"] if model is not None and model.serves_safe_choice else None
        from rerank.safe import response_block

        self._serving = None if model is None else response_block(model.serving)  # read once: the artifact does not change
        self._fetch_fields: list[str] | None = None  # fetch_fields(), read once
        if model is not None:
            from rerank.model.onnx_ranker import cpu_runtime

            self.scorer = cpu_runtime(model.ranker, model_runtime)
        if model is not None and (micro_batch or (micro_batch is None and getattr(model.ranker.device, "type", "cpu") == "cuda")):
            from rerank.model.batching import MicroBatcher

            self.batcher = MicroBatcher(self.scorer, **dict(micro_batch_options or {}))

    def close(self) -> None:
        """Stop the micro-batcher's and the query encoder's threads, if any (the engine and stores belong to the caller)."""
        if self.batcher is not None:
            self.batcher.close()
        if self._encode_pool is not None:
            self._encode_pool.shutdown(wait=False)  # calls in flight still get their queries

    @classmethod
    def noop(cls, engine: Any, index: str, *, text_encoder: Any | None = None, image_encoder: Any | None = None, **kw: Any) -> "Reranker":
        """Keeps the first-stage order (baseline, kill switch); same call and return shapes."""
        return cls(engine, index, None, text_encoder=text_encoder, image_encoder=image_encoder, **kw)

    def fetch_fields(self) -> list[str]:
        """The fields the call fetches by id for candidates whose ``_source`` lacks them (vectors and what the model reads);
        worked out once per reranker (the artifact does not change)."""
        if self._fetch_fields is None:
            self._fetch_fields = self._model_fields()
        return list(self._fetch_fields)

    def _model_fields(self) -> list[str]:
        from rerank.model.inputs import colour_fields

        art = self.model
        spec = art.feature_spec
        out = [F.TEXT_VEC, F.IMAGE_VEC, *spec.cat_fields, *colour_fields(art.colour if spec.colour else None)]
        from rerank.model.intent import INTENT_ATTRIBUTES, photo_fields

        # attributes read with their photo-completed values: the intent bound's, and the colour the diversity step compares
        attrs = (*(INTENT_ATTRIBUTES if getattr(art, "intent", None) is not None else ()),
                 *((F.COLOUR,) if self.diversity_config.colour_name_weight > 0 else ()))
        if attrs:
            out += [f for f in (*attrs, *photo_fields()) if f not in out]
        return out

    def prefill_aligned_cache(self, *, limit: int | None = None, batch_size: int = 2048, progress: bool = False) -> int:
        """Project the photos of up to ``limit`` indexed products (default: the cache's size) into the aligned-photo
        cache, so that the first calls to meet a product do not pay its projection (a long-running service gets
        there by itself as its traffic touches the catalog). Returns the rows projected (0 without a cache).

        Reads ``image_vec`` only: through ``LocalEngine.get_arrays`` by id batches with the local engine, through
        ``iter_documents`` (a scroll of whole sources) otherwise."""
        cache = self.aligned_cache
        if cache is None:
            return 0
        from tqdm import tqdm

        limit = cache.max_entries if limit is None else min(int(limit), cache.max_entries)
        done = 0

        def batches():  # lists of (id, raw image vector)
            if hasattr(self.engine, "ids") and array_getter(self.engine) != self.engine.get:
                all_ids = self.engine.ids(self.index)
                for s in range(0, len(all_ids), batch_size):
                    got = self.engine.get_arrays(self.index, all_ids[s : s + batch_size], fields=[F.IMAGE_VEC])
                    yield [(i, d[F.IMAGE_VEC]) for i, d in got.items() if d.get(F.IMAGE_VEC) is not None]
                return
            batch = []
            for d in self.engine.iter_documents(self.index, batch_size=min(batch_size, 1000)):
                if d.get(F.IMAGE_VEC) is not None and d.get(F.ID) is not None:
                    batch.append((str(d[F.ID]), d[F.IMAGE_VEC]))
                    if len(batch) >= min(batch_size, limit - done):  # never read more of the scroll than is kept
                        yield batch
                        batch = []
            yield batch

        with tqdm(total=limit, desc="aligned photos", unit="photo", disable=not progress) as bar:
            for pairs in batches():
                pairs = pairs[: limit - done]
                if pairs:
                    cache([i for i, _ in pairs], np.asarray([v for _, v in pairs], dtype=np.float32))
                    done += len(pairs)
                    bar.update(len(pairs))
                if done >= limit:
                    break
        return done

    def warm_up(self) -> None:
        """One untimed pass through the encoder and the model (lazy initialisation, kernels), so that the
        first real call is not the slow one. Not counted in :attr:`stats`."""
        if self.model is None:
            return
        from rerank.model.inputs import build_request_features

        art = self.model
        # through the pool when there is one: its first thread starts now, not in the first real call
        qvec, _ = self._encode_pool.submit(self._encode_query, "warm up", None).result() if self._encode_pool is not None \
            else self._encode_query("warm up", None)
        cand = candidates_from_hits(["__warm_up__"], [1.0])
        doc = {"__warm_up__": {F.TEXT_VEC: qvec.tolist()}}
        req = build_request_features(qvec, cand, doc, art.feature_spec, history=None,
                                     project=art.alignment.project if art.alignment is not None else None,
                                     text_dim=art.text_encoder.dim, image_dim=art.image_encoder.dim if art.image_encoder else None,
                                     colour=art.colour, intent=getattr(art, "intent", None))
        self._forward(req, self.clock())

    @property
    def model_runtime(self) -> str | None:
        """``onnx`` or ``torch``: what runs the model's forward pass (None without a model)."""
        from rerank.model.onnx_ranker import runtime_name

        return None if self.scorer is None else runtime_name(self.scorer)

    @property
    def name(self) -> str:
        return "noop" if self.model is None else "fusion"

    @property
    def serving(self) -> dict[str, Any] | None:
        """The response's ``fusionrank.serving``: ``{"policy": "model" | "safe_choice", "signal", "reason"}`` from the
        artifact's training verdict (:mod:`rerank.safe`); None for the noop reranker. A copy per call."""
        return None if self._serving is None else dict(self._serving)

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the counters: calls, degraded, degraded:<reason>."""
        with self._lock:
            return dict(self._stats)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] = self._stats.get(key, 0) + 1

    # ------------------------------------------------------------------ the calls
    def rerank(self, query: str, hits_or_opensearch_response: Any, *, user_id: str | None = None, top_k: int | None = None, query_image: Any | None = None,
               diversity: float | str | None = None) -> Any:
        """Rerank given first-stage hits; see the module doc for the return shapes. ``diversity``: the lambda of the
        diversity step for this call (a number in [0, 1] or ``"auto"``; None: the reranker's default)."""
        requested = self._check_diversity(diversity)
        text, inp, cands, docs = self._inputs(query, hits_or_opensearch_response, user_id, top_k, query_image)
        unknown: list[str] = []
        ranked, degraded, timings, div = self._score(text, cands, docs, user_id, query_image, requested, top_k, unknown)
        if top_k is not None:
            ranked = ranked[:top_k]
        items = self._render(inp, ranked)
        if inp.kind == "opensearch":
            resp = {k: copy_json(v) for k, v in hits_or_opensearch_response.items() if k != "hits"}
            inner = {k: copy_json(v) for k, v in hits_or_opensearch_response["hits"].items() if k != "hits"}
            inner["hits"] = items
            inner["max_score"] = max((h.score for h in ranked), default=None)
            resp["hits"] = inner
            resp["fusionrank"] = {"degraded": degraded, "reranker": self.name, "model_version": self._version(), "timings_ms": timings,
                                  "diversity": div, "unknown_ids": unknown, "serving": self.serving}
            return resp
        return RankedHits(tuple(ranked), degraded, timings, tuple(items), self._version(), div, self.serving)

    def search(self, query: str, *, user_id: str | None = None, size: int = 10, filters: Filters | None = None, query_image: Any | None = None,
               diversity: float | str | None = None) -> RankedHits:
        """Hybrid retrieval (BM25 + kNN text + kNN image) then rerank (and the diversity step, see :meth:`rerank`);
        returns the top ``size``."""
        requested = self._check_diversity(diversity)
        text = self._check_args(query, user_id, size, query_image)
        if filters is not None and not isinstance(filters, Filters):
            raise TypeError(f"filters must be an indexing.engines.base.Filters, got {type(filters).__name__}")
        cs = self.retriever.retrieve(query, query_image=query_image, filters=filters, user_id=user_id, with_source=True)
        docs = {c.id: c.source for c in cs.candidates if c.source is not None}
        ranked, degraded, timings, div = self._score(text, cs.candidates, docs, user_id, query_image, requested, size)
        ranked = ranked[:size]
        items = tuple(Hit(h.id, h.score, docs.get(h.id)) for h in ranked)
        return RankedHits(tuple(ranked), degraded, timings, items, self._version(), div, self.serving)

    # ------------------------------------------------------------------ internals
    def _inputs(self, query: Any, hits_or_opensearch_response: Any, user_id: Any, top_k: Any, query_image: Any) -> tuple[str, _Input, tuple[Candidate, ...], dict[str, Mapping[str, Any]]]:
        """The checked query text, the parsed hits, their first-stage candidates and the sources they came with."""
        text = self._check_args(query, user_id, top_k, query_image)
        inp = _parse(hits_or_opensearch_response)
        docs = {i: s for i, s in zip(inp.ids, inp.sources) if s is not None}
        return text, inp, candidates_from_hits(inp.ids, inp.scores), docs

    def _version(self) -> str | None:
        return None if self.model is None else self.model.version

    @staticmethod
    def _check_args(query: Any, user_id: Any, top_k: Any, query_image: Any) -> str:
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        query = check_query_text(query)  # length and NUL rules (ConfigError naming the limit)
        if not query and query_image is None:
            raise ConfigError("empty query: give a query text or a query image")
        if user_id is not None and (not isinstance(user_id, str) or not user_id):
            raise TypeError(f"user_id must be a non-empty string or None, got {user_id!r}")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int):
                raise TypeError(f"top_k/size must be an int, got {type(top_k).__name__}")
            check_size(top_k, "top_k")
        return query.strip()

    def _check_diversity(self, diversity: Any) -> tuple[float | str, str]:
        """The call's diversity and where it came from: ``(parsed, "request")``, or the reranker's ``(default, "default")``."""
        if diversity is None:
            return self.diversity, "default"
        return parse_diversity(diversity), "request"

    def _score(self, text: str, cands: Sequence[Candidate], docs: dict[str, Mapping[str, Any]], user_id: str | None, query_image: Any,
               requested: tuple[float | str, str] = (0.0, "default"), depth: int | None = None, unknown: list[str] | None = None,
               ) -> tuple[list[RankedHit], str | None, dict[str, float], dict[str, Any]]:
        """The new order (or the first-stage one when failing open) and the diversity block; ``unknown`` (when given)
        receives the ids the call looked up in the index and did not find (scored from what the call has: the first
        stage, no vectors)."""
        t0 = self.clock()
        timings: dict[str, float] = {}
        self._count("calls")
        out = None
        degraded = None
        if self.model is not None and cands:
            try:
                scores, explain, req, all_docs, tiers = self._model_scores(text, cands, docs, user_id, query_image, t0, timings, unknown)
                out = self._diversified(text, cands, scores, explain, req, all_docs, query_image, requested, depth, t0, timings, tiers)
            except _Degrade as d:
                degraded = d.reason
                self._count("degraded")
                self._count(f"degraded:{d.reason}")
                log.warning("rerank degraded to first-stage order (%s): %s", d.reason, d.detail)
        timings["total"] = round((self.clock() - t0) * 1000.0, 3)
        if out is None:  # noop, empty, or degraded: first-stage order
            why = (f"the call failed open ({degraded})" if degraded else "the noop reranker keeps the first-stage order" if self.model is None
                   else "no candidates")
            div = {"lambda": 0.0, "requested": requested[0], "source": requested[1], "reason": f"not applied: {why}", "applied": False}
            return [RankedHit(c.id, float(c.score), c.rank, float(c.score), c.rank,
                              {"gates": {}, "history_top": [], "first_stage": _first_stage_explain(c),
                               "diversity": {"lambda": 0.0, "relevance_rank": c.rank, "max_similarity": None}}) for c in cands], degraded, timings, div
        return out[0], None, timings, out[1]

    def _diversified(self, text, cands, scores, explain, req, docs, query_image, requested, depth, t0, timings, tiers=None):
        """The model's order (score, ties by id), re-ordered by the diversity step when its lambda is above 0 (within
        each tier of the intent bound, ``tiers`` per candidate; None: one tier); the ranked hits and the response's
        ``diversity`` block. Times the step as ``mmr``; the budget is checked after it."""
        s = self.clock()
        order = base = sorted(range(len(cands)), key=lambda i: (-scores[i], cands[i].id))
        value, source = requested
        placed: Sequence[float | None] = [None] * len(order)
        try:
            events = history_events(req.hist_event, req.hist_mask) if value == AUTO else ()
            choice = choose_lambda(value, query=text, docs=[docs.get(c.id) for c in cands] if value == AUTO else (), events=events,
                                   has_image=query_image is not None, source=source, config=self.diversity_config)
            if choice.value > 0 and len(order) > 1:
                idx = np.asarray(order)
                # the vectors stay in the candidates' order (rows=idx): the step compares only the ones that can move
                colour, names = document_inputs([docs.get(c.id) for c in cands], self.diversity_config)
                d = diversify(np.asarray(scores)[idx], choice.value, text=req.cand_text, text_mask=req.cand_text_mask, image=req.cand_image,
                              image_mask=req.cand_image_mask, colour=colour, rows=idx, tiers=None if tiers is None else tiers[idx], colour_names=names,
                              config=self.diversity_config, depth=depth if depth is not None else self.diversity_config.depth)
                placed = [d.max_similarity[k] for k in d.order]
                order = [order[k] for k in d.order]
            div = {**choice.to_dict(), "applied": choice.value > 0}
        except Exception as e:  # a failure of the diversity step keeps the model's order (the call still answers)
            log.warning("the diversity step failed, keeping the model's order: %s: %s", type(e).__name__, e)
            self._count("diversity_error")
            choice = LambdaChoice(0.0, value, source, f"not applied: the diversity step failed ({type(e).__name__})")
            div = {**choice.to_dict(), "applied": False}
            order, placed = base, [None] * len(base)
        timings["mmr"] = round((self.clock() - s) * 1000.0, 3)  # the diversity step alone (the explanations below are not)
        rel_rank = {i: r for r, i in enumerate(base, 1)} if order is not base else None
        lam = choice.value
        ranked = []
        for r, i in enumerate(order, 1):
            c = cands[i]
            ex = explain[i]  # a fresh dict per call (ScoredRequest.explain_all)
            ex["first_stage"] = _first_stage_explain(c)
            sim = placed[r - 1]
            ex["diversity"] = {"lambda": lam, "relevance_rank": rel_rank[i] if rel_rank is not None else r,
                               "max_similarity": None if sim is None else round(sim, 6)}
            ranked.append(RankedHit(c.id, float(scores[i]), r, float(c.score), c.rank, ex))
        self._check_budget(t0, "mmr", timings, None)
        return ranked, div

    def _check_budget(self, t0: float, stage: str, timings: dict[str, float], started: float | None) -> None:
        """Record the stage's time (``started=None``: already recorded) and fail open if the budget is spent."""
        now = self.clock()
        if started is not None:
            timings[stage] = round((now - started) * 1000.0, 3)
        spent = (now - t0) * 1000.0
        if spent > self.budget_ms:
            raise _Degrade(TIMEOUT, f"{spent:.1f} ms spent after stage {stage!r}, budget {self.budget_ms:g} ms")

    def _model_scores(self, text, cands, docs, user_id, query_image, t0, timings, unknown=None):
        req, docs = self._features(text, cands, docs, user_id, query_image, t0, timings, unknown)
        s = self.clock()
        if self._safe_signal is not None:  # the artifact serves the safe choice: the signal's order, no forward pass
            from rerank.safe import signal_scores

            try:
                scores = signal_scores(self._safe_signal, req, self.model.feature_spec.lists)
            except Exception as e:  # fail open, as a model failure would
                raise _Degrade(MODEL_ERROR, f"{type(e).__name__}: {e}") from e
            self._check_budget(t0, "model", timings, s)
            explain = [{"gates": {}, "history_top": [], "safe_choice": {"signal": self._safe_signal, "score": round(float(v), 6)}} for v in scores]
            return scores.tolist(), explain, req, docs, None
        try:
            scored = self._forward(req, t0)
            scores = np.asarray(scored.scores, dtype=np.float64)
            if scores.shape != (len(cands),) or not np.isfinite(scores).all():
                raise FusionRankError(f"model returned {scores.shape} scores with non-finite values for {len(cands)} candidates")
        except _Degrade:
            raise
        except Exception as e:  # fail open on any model failure
            raise _Degrade(MODEL_ERROR, f"{type(e).__name__}: {e}") from e
        explain = scored.explain_all()  # every candidate's explanation in one vectorized pass
        intent = self.model.intent
        if intent is not None:  # the query-intent bound: products the query's named type contradicts go below the others
            from rerank.model.intent import bound_scores

            try:
                assessed = intent.assess(req.query, [docs.get(c.id) for c in cands])
                model_scores, scores = scores, bound_scores(scores, assessed.tiers)
            except Exception as e:  # fail open, as a model failure would
                raise _Degrade(MODEL_ERROR, f"intent bound: {type(e).__name__}: {e}") from e
            for ex, ix in zip(explain, assessed.explain_all(model_scores)):
                ex["intent"] = ix
        self._check_budget(t0, "model", timings, s)
        return scores.tolist(), explain, req, docs, (assessed.tiers if intent is not None and assessed.tiers.any() else None)

    def request_features(self, query: str, hits_or_opensearch_response: Any, *, user_id: str | None = None, query_image: Any | None = None) -> Any:
        """The model's inputs for this call (a :class:`rerank.model.inputs.RequestFeatures`), built exactly as
        :meth:`rerank` builds them (fetch, history, features, query encoding), without the forward pass: what
        ``fusionrank bench batch`` replays on another device. Raises :class:`FusionRankError` where :meth:`rerank`
        would fail open (a spent budget included), and :class:`ConfigError` without a model."""
        if self.model is None:
            raise ConfigError("request_features needs a reranker with a model")
        text, _, cands, docs = self._inputs(query, hits_or_opensearch_response, user_id, None, query_image)
        if not cands:
            raise ConfigError("request_features needs at least one hit")
        try:
            return self._features(text, cands, docs, user_id, query_image, self.clock(), {})[0]
        except _Degrade as d:
            raise FusionRankError(f"the features of {query!r} could not be built ({d.reason}): {d.detail}") from d

    def _features(self, text, cands, docs, user_id, query_image, t0, timings, unknown=None):
        """The model inputs of one call (:class:`rerank.model.inputs.RequestFeatures`) and the candidates' documents
        with what was fetched: fetch, history and features, the query encoded on the encoder's thread meanwhile;
        ``_Degrade`` where the call fails open."""
        from rerank.model.inputs import HistoryInput, prepare_request_features

        art = self.model
        spec = art.feature_spec
        align = art.alignment
        if not text and (self.image_encoder is None or align is None):
            raise ConfigError("an image-only query needs an image encoder and a model with a text-image alignment")
        pending: Future | None = None
        if self._encode_pool is not None:
            started = threading.Event()
            try:
                pending = self._encode_pool.submit(self._encode_started, started, text, query_image)
            except RuntimeError:  # the pool was shut down (close()): encode here
                pending = None
            else:
                # Hand the GIL over until the encoder's thread runs: otherwise it waits for this thread's Python
                # work (fetch, profile, features) to give the GIL up, up to sys.getswitchinterval() (5 ms), before
                # it can even tokenize; once it is in onnxruntime or torch (no GIL) both threads run.
                started.wait(timeout=0.05)
        if pending is None:
            qvec, timings["encode"] = self._query_vector(None, text, query_image, t0)
            self._check_budget(t0, "encode", timings, None)

        s = self.clock()
        hist = profile = None
        names: tuple[str, ...] = ()
        if user_id is not None and self.history is not None:
            try:
                profile = self.history.get_profile(user_id)
                hist = HistoryInput.from_profile(profile)
            except HistoryError as e:
                raise _Degrade(HISTORY_ERROR, f"profile of user {user_id!r}: {e}") from e
            except EngineError as e:  # history vectors are read from the engine
                raise _Degrade(ENGINE_ERROR, f"history vectors of user {user_id!r}: {e}") from e
            names = history_attribute_fields(art) if hist.product_ids else ()
        self._check_budget(t0, "history", timings, s)

        s = self.clock()
        need = [c.id for c in cands if F.TEXT_VEC not in (docs.get(c.id) or {})]
        # the history products' attributes the model compares, where neither the cached profile nor a hit has them:
        # read in the same engine call as the hits
        known = _memo_attributes(profile, self.index, names, hist.product_ids) if names else None
        extra = _attribute_needs(hist.product_ids, docs, need, names) if names and known is None else []
        fetched: Mapping[str, Any] = {}
        if need or extra:
            try:
                # LocalEngine.get_arrays: the same values as numpy rows (no list round trip); other engines: get()
                getter = array_getter(self.engine)
                fetched = getter(self.index, need + extra, fields=self.fetch_fields())
            except EngineError as e:
                what = f"vectors of {len(need)} hits" + (f" and the attributes of {len(extra)} history products" if extra else "")
                raise _Degrade(ENGINE_ERROR, f"fetching {what}: {e}") from e
            docs = {**docs, **{i: {**(docs.get(i) or {}), **fetched[i]} for i in need if i in fetched}}
            if unknown is not None:
                unknown.extend(i for i in need if i not in fetched)
        self._check_budget(t0, "fetch", timings, s)
        if names:
            if known is None:
                known = _read_attributes(profile, self.index, names, hist.product_ids, docs, fetched)
            hist = hist.with_attributes(known)

        s = self.clock()
        try:  # everything the model reads but the query, while the query may still be encoding
            # the training log's behaviour (artifact statistics; none: neutral columns, as for a query the log never saw)
            beh = (art.behaviour.features(text, [c.id for c in cands], product_scope=spec.behaviour_product_scope)
                   if spec.behaviour and art.behaviour is not None and text else None)
            prepared = prepare_request_features(
                cands, docs, spec, history=hist, project=align.project if align is not None else None, aligned_cache=self.aligned_cache,
                text_dim=art.text_encoder.dim, image_dim=art.image_encoder.dim if art.image_encoder else None, colour=art.colour,
                intent=getattr(art, "intent", None), behaviour=beh,
            )
        except Exception as e:  # fail open on any model failure
            raise _Degrade(MODEL_ERROR, f"{type(e).__name__}: {e}") from e
        self._check_budget(t0, "features", timings, s)

        if pending is not None:
            qvec, timings["encode"] = self._query_vector(pending, text, query_image, t0)
            self._check_budget(t0, "encode", timings, None)
        try:
            return prepared.finish(qvec), docs
        except Exception as e:  # fail open on any model failure
            raise _Degrade(MODEL_ERROR, f"{type(e).__name__}: {e}") from e

    def _encode_query(self, text: str, query_image: Any) -> tuple[np.ndarray, float]:
        """The query vector (the text's, or the image's aligned into the text space) and the milliseconds it took."""
        s = self.clock()
        if text:
            qvec = np.asarray(self.text_encoder.encode([text]), dtype=np.float32)[0]
        else:
            align = self.model.alignment
            qvec = np.asarray(align.project(np.asarray(self.image_encoder.encode([query_image]), dtype=np.float32)), dtype=np.float32)[0]
        return qvec, round((self.clock() - s) * 1000.0, 3)

    def _encode_started(self, started: threading.Event, text: str, query_image: Any) -> tuple[np.ndarray, float]:
        started.set()
        return self._encode_query(text, query_image)

    def _query_vector(self, pending: Future | None, text: str, query_image: Any, t0: float) -> tuple[np.ndarray, float]:
        """:meth:`_encode_query`'s result: from the encoder's thread (``pending``, waiting at most the budget left) or,
        without one, computed here. An encoder failure or a wait past the budget fails open; a bad argument (e.g. a
        query image that is not an image) still raises."""
        try:
            if pending is None:
                return self._encode_query(text, query_image)
            left_s = max(self.budget_ms / 1000.0 - (self.clock() - t0), 0.0)
            try:
                return pending.result(timeout=left_s)
            except FutureTimeout as e:
                if pending.done():  # the encoder itself raised a TimeoutError: an encoder failure (below)
                    raise
                pending.cancel()
                raise _Degrade(TIMEOUT, f"the query was not encoded within the {left_s * 1000:.1f} ms left of the budget") from e
        except (_Degrade, ConfigError):
            raise
        except Exception as e:  # an encoder failure must not break the caller's search
            raise _Degrade(ENCODER_ERROR, f"{type(e).__name__}: {e}") from e

    def _forward(self, req: Any, t0: float) -> Any:
        """One request's forward pass: directly, or through the micro-batcher (waiting at most the budget left)."""
        if self.batcher is None:
            return self.scorer.score(req)
        from rerank.model.batching import Overloaded

        left_s = max(self.budget_ms / 1000.0 - (self.clock() - t0), 0.0)
        try:
            return self.batcher.score(req, timeout_s=left_s)
        except Overloaded as e:
            raise _Degrade(OVERLOADED, str(e)) from e
        except TimeoutError as e:
            raise _Degrade(TIMEOUT, f"no micro-batch result within the {left_s * 1000:.1f} ms left of the budget") from e

    @staticmethod
    def _render(inp: _Input, ranked: Sequence[RankedHit]) -> list[Any]:
        pos = {i: k for k, i in enumerate(inp.ids)}
        out = []
        # an OpenSearch response's RankedHit list is not returned, so its explanation dicts can be handed over
        # without a copy; a list call returns both (``.hits`` and the items), which must not share them
        share_explanation = inp.kind == "opensearch"
        for h in ranked:
            orig = inp.raw[pos[h.id]]
            if inp.kind == "hits":
                out.append(replace(orig, score=h.score))
            else:
                d = copy_json(orig) if type(orig) is dict else copy_json(dict(orig))  # a new dict either way
                d["_score"] = h.score
                d["_previous_score"] = orig.get("_score")
                d["_explanation"] = dict(h.explanation) if share_explanation else copy_json(dict(h.explanation))
                out.append(d)
        return out


__all__ = ["DEFAULT_BUDGET_MS", "OVERLOADED", "REASONS", "RankedHit", "RankedHits", "Reranker", "candidates_from_hits", "history_attribute_fields"]
