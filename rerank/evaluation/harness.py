"""The evaluation harness: one catalog + queries + graded qrels -> every system on the same queries.

Steps of :func:`evaluate`:

1. Read queries and qrels (:mod:`rerank.datasets.data`), map grades to gains (``--gain``).
2. Index the catalog once per (catalog content, images root, text and image model ids, mapping) into
   a LocalEngine under ``<data_dir>/eval-cache/<key>/`` (the indexing job itself is injected by the
   caller, so ``rerank`` never imports ``workers``; the CLI passes ``workers.jobs.run_index_job``).
   A finished index is marked by ``index.json``; later runs reuse it.
3. Choose the evaluated queries: with ``train_queries``/``train_qrels`` all of ``queries``; otherwise
   the seeded split written to the data dir (:mod:`rerank.datasets.splits`), ``split`` (default
   ``test``). Queries without any positive gain are left out (NDCG is undefined for them) and counted.
4. Run the first stage once per query (BM25, kNN text, kNN image when it applies). ``rerank`` mode
   restricts every list to the query's judged products (a product-id term filter); ``retrieve`` mode
   searches the whole catalog (``per_list`` = ``top_n`` hits per list).
5. Run each system (:mod:`rerank.evaluation.systems`), score its runs (:mod:`rerank.datasets.metrics`), average.
   Beside the relevance metrics every system gets the diversity of its top 10 (:func:`diversity_metrics`):
   ``ild@10`` and ``distinct@10`` per catalog attribute (article type, colour, brand where present).
6. With ``diversity`` (``fusionrank eval --diversity 0,0.1,0.3,auto``) the fusion systems are scored once and
   re-ordered by the rerank call's diversity step (:mod:`rerank.diversity`) at each lambda; the report for the
   first lambda carries one report per lambda in ``by_diversity`` (the other systems are the same in each).
"""

from __future__ import annotations

import dataclasses

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.engines.base import SearchEngine
from indexing.errors import ConfigError
from mappings import DEFAULT_MAPPING
from rerank.diversity import DiversityConfig, diversity_label, parse_diversity
from rerank.datasets.data import Query, file_sha256, read_event_users, read_qrels, read_queries
from rerank.datasets.splits import DEFAULT_SEED, UBI_VALIDATION_SHARE, assign, load_or_create_splits, ubi_split
from rerank.evaluation.systems import DEFAULT_SYSTEMS, SYSTEMS, EvalContext, EvalItem, FusionInputs, NotApplicable
from rerank.datasets.metrics import (GAIN_DESCRIPTIONS, MetricSpec, distinct_at_k, gain_mapping, ild_at_k, query_metrics)
from rerank.retrieval.retriever import FirstStage, RetrievalConfig, Retriever
from rerank.training.ranker import DatasetSpec
from rerank.datasets.pools import (  # noqa: F401  (re-exported: the harness's index cache and items)
    EVAL_ALIAS,
    MAX_POOL,
    CachedIndex,
    Indexer,
    _gains,
    _key,
    build_items,
    cached_index,
    dataset_name,
    eval_queries,
    index_key,
    judged_share,
    mirror_index,
    transform_id,
)

log = logging.getLogger(__name__)
#: how a set of training queries only (``--train-queries``) is split: train and validation, no test (every trainable
#: system, the fusion ones included, trains on the same 90 % and stops early on the same 10 %); a log's query texts
#: (``--train-ubi``) are split by :func:`ubi_split` instead
TRAIN_ONLY_SPLIT = (0.9, 0.1, 0.0)

#: what labels a log's queries (``--ubi-labels``)
UBI_LABELS = ("clicks", "qrels")

MODES = ("rerank", "retrieve")
#: catalog attributes whose distinct values in the top 10 are counted (``distinct@10``), where the catalog has them
DIVERSITY_FIELDS: tuple[str, ...] = (F.ARTICLE_TYPE, F.COLOUR, F.BRAND)
DIVERSITY_K = 10


@dataclass(frozen=True)
class EvalRequest:
    catalog: Path
    queries: Path
    qrels: Path
    gain: str
    mode: str = "rerank"
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    split: str = "test"
    events: Path | None = None
    images_root: Path | None = None
    train_queries: Path | None = None
    train_qrels: Path | None = None
    train_events: Path | None = None
    train_catalog: Path | None = None
    train_images_root: Path | None = None
    model_dirs: Mapping[str, Path] = field(default_factory=dict)
    limit_queries: int | None = None
    top_n: int = 200
    rerank_depth: int = 100
    seed: int = DEFAULT_SEED
    dataset: str | None = None
    text_model: str = "minilm"
    text_backend: str = "torch"
    image_model: str = "efficientnet_lite0"
    device: str = "auto"
    mapping: str = DEFAULT_MAPPING
    #: photo attribute model (``fusionrank attributes train``): with a products-v4 ``mapping`` the evaluation index
    #: completes missing catalog attributes from the photos at ``attribute_threshold``, as a shop's index would
    attribute_model: str | None = None
    attribute_threshold: float = 0.8
    options: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = False
    #: query subsets reported beside the whole: name -> regular expression searched in the query text (case-insensitive),
    #: or ``values:FIELD``: the queries naming any value the catalog gives FIELD (:func:`subset_pattern`)
    subsets: Mapping[str, str] = field(default_factory=dict)
    #: more datasets the fusion systems train on (their train and validation splits), e.g. simulated shoppers
    train_also: tuple[DatasetSpec, ...] = ()
    #: lambdas of the diversity step the fusion systems are scored at (numbers in [0, 1] or "auto"); () : none
    diversity: tuple[float | str, ...] = ()
    diversity_config: DiversityConfig | None = None
    #: a catalog file whose attribute values count for ``distinct@10`` instead of the indexed ones (e.g. one that
    #: holds the values the evaluated catalog withheld)
    attributes_catalog: Path | None = None
    #: a UBI search log (file or folder): trainable systems learn from implicit judgments of a click model instead of qrels
    train_ubi: Path | None = None
    click_model: str = "pbm"
    #: --train-ubi: products the log never showed for a query are "unknown" (left out of its training list) or "irrelevant" (gain 0)
    ubi_unshown: str = "irrelevant"
    #: --train-ubi: evaluate only the queries with at least this many searches in the log (head queries), whose
    #: behaviour then stays in the training log (not excluded); None: every query of the split, excluded from training
    head_queries: int | None = None
    #: --train-ubi: the share of the log's query texts the trainable systems validate on (the rest trains)
    ubi_validation_share: float = UBI_VALIDATION_SHARE
    #: --train-ubi: what labels the log's training and validation queries: ``clicks`` (the click model's judgments) or
    #: ``qrels`` (the graded ``qrels`` of the same query texts, with the same split and the same behaviour columns: the
    #: reference that learning from clicks is measured against)
    ubi_labels: str = "clicks"

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        gain_mapping(self.gain)  # UnknownNameError lists the mappings
        for s in self.systems:
            SYSTEMS.get(s)
        if not self.systems:
            raise ConfigError("no systems to evaluate")
        if (self.train_queries is None) != (self.train_qrels is None):
            raise ConfigError("--train-queries and --train-qrels go together")
        if self.train_ubi is not None and self.train_queries is not None:
            raise ConfigError("--train-ubi replaces --train-queries/--train-qrels: give one or the other")
        if self.train_ubi is not None:
            from rerank.datasets.clicks import MODELS

            if self.click_model not in MODELS:
                raise ConfigError(f"unknown click model {self.click_model!r}; valid: {', '.join(MODELS)}")
            if self.ubi_unshown not in ("unknown", "irrelevant"):
                raise ConfigError(f"--ubi-unshown must be unknown or irrelevant, got {self.ubi_unshown!r}")
            if self.ubi_labels not in UBI_LABELS:
                raise ConfigError(f"--ubi-labels must be one of {', '.join(UBI_LABELS)}, got {self.ubi_labels!r}")
        elif self.ubi_labels != "clicks":
            raise ConfigError("--ubi-labels needs --train-ubi (it labels that log's queries)")
        if not 0.0 < self.ubi_validation_share < 1.0:
            raise ConfigError(f"--ubi-validation-share must be in (0, 1), got {self.ubi_validation_share}")
        if self.head_queries is not None:
            if self.train_ubi is None:
                raise ConfigError("--head-queries needs --train-ubi (head queries are counted in that log)")
            if self.head_queries < 1:
                raise ConfigError(f"--head-queries must be >= 1, got {self.head_queries}")
        if self.limit_queries is not None and self.limit_queries < 1:
            raise ConfigError(f"--limit-queries must be >= 1, got {self.limit_queries}")
        for name, p in (("catalog", self.catalog), ("queries", self.queries), ("qrels", self.qrels)):
            if not Path(p).is_file():
                raise ConfigError(f"--{name} file not found: {p}")
        for name, rx in self.subsets.items():
            if rx.startswith(VALUES_SUBSET):
                if not rx[len(VALUES_SUBSET) :].strip():
                    raise ConfigError(f"--subset {name}: {VALUES_SUBSET} needs a catalog field, e.g. {name}={VALUES_SUBSET}base_colour")
                continue
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"--subset {name}: bad regular expression {rx!r}: {e}") from None
        for d in self.train_also:
            d.check()
        labels = [diversity_label(parse_diversity(v, what="--diversity")) for v in self.diversity]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--diversity lists a lambda twice: {', '.join(labels)}")
        if self.attributes_catalog is not None and not Path(self.attributes_catalog).is_file():
            raise ConfigError(f"--attributes-catalog file not found: {self.attributes_catalog}")


@dataclass(frozen=True)
class SystemResult:
    name: str
    metrics: Mapping[str, float]
    runs: int
    seconds: float
    note: str | None = None
    subsets: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # subset name -> metrics
    #: ``{"ild@10": x, "distinct@10": {field: mean}}`` and, for a diversified system, ``"diversity"``: the lambdas applied
    diversity: Mapping[str, Any] = field(default_factory=dict)
    #: metric -> one value per evaluated query (the mean over runs), in the report's query order (not in the JSON)
    per_query: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: metric -> the 95% interval of the mean over queries ``(lo, hi)`` (None below two queries)
    ci95: Mapping[str, tuple[float, float] | None] = field(default_factory=dict)
    #: ``{"system": best baseline, "is_best_baseline": bool, metric: PairedTest}``; None without a first-stage system
    vs_best_baseline: Mapping[str, Any] | None = None
    #: what a fusion system's artifact serves (``{"policy": "model" | "safe_choice", ...}``, see rerank.safe); None otherwise
    serving: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class EvalReport:
    dataset: str
    mode: str
    queries: int
    split: str
    gain: str
    systems: Mapping[str, SystemResult]
    skipped: Mapping[str, str]
    info: Mapping[str, Any]
    #: the diversity lambda of this report (a label: "0", "0.3", "auto"), None without ``--diversity``
    diversity: str | None = None
    #: with several lambdas: one report per lambda (this one among them), in the order given
    by_diversity: Mapping[str, "EvalReport"] = field(default_factory=dict)
    #: the best first-stage system by NDCG@10, every row's paired test is against it (None: no first-stage system ran)
    best_baseline: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON object; with several lambdas ``{"by_diversity": {label: <that lambda's object>}}``."""
        if len(self.by_diversity) > 1:
            return {"by_diversity": {k: r._json() for k, r in self.by_diversity.items()}}
        return self._json()

    def _json(self) -> dict[str, Any]:
        def div(r: SystemResult) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in r.diversity.items():
                out[k] = {f: round(x, 4) for f, x in v.items()} if k == "distinct@10" else (round(v, 6) if isinstance(v, float) else v)
            return out

        def stats(r: SystemResult) -> dict[str, Any]:
            vs = None
            if r.vs_best_baseline is not None:
                vs = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in r.vs_best_baseline.items()}
            return {"ci95": {m: (None if ci is None else [round(ci[0], 6), round(ci[1], 6)]) for m, ci in r.ci95.items()},
                    "vs_best_baseline": vs, **({"serving": dict(r.serving)} if r.serving is not None else {})}

        return {
            "dataset": self.dataset,
            "mode": self.mode,
            "queries": self.queries,
            "split": self.split,
            "gain": self.gain,
            "gain_mapping": GAIN_DESCRIPTIONS.get(self.gain, self.gain),
            "best_baseline": self.best_baseline,
            "statistics": statistics_info(),
            "systems": {
                n: {**{k: round(v, 6) for k, v in r.metrics.items()}, **stats(r), **div(r), "runs": r.runs, "seconds": round(r.seconds, 2),
                    **({"note": r.note} if r.note else {}),
                    **({"subsets": {s: {k: round(v, 6) for k, v in m.items()} for s, m in r.subsets.items()}} if r.subsets else {})}
                for n, r in self.systems.items()
            },
            "skipped_systems": dict(self.skipped),
            **({"diversity": self.diversity} if self.diversity is not None else {}),
            **dict(self.info),
        }


def statistics_info() -> dict[str, Any]:
    """How the report's intervals and tests were computed (the JSON's ``"statistics"``)."""
    from rerank.evaluation.stats import ALPHA, CI_METHOD, STAT_METRICS, TEST_METHOD

    return {"metrics": list(STAT_METRICS), "ci95": CI_METHOD, "test": TEST_METHOD, "alpha": ALPHA,
            "best_baseline": "the first-stage system (bm25, knn_text, knn_image, hybrid_rrf, hybrid_minmax) with the highest NDCG@10 "
                             "among those evaluated; every row is tested against it on the same queries"}


# --------------------------------------------------------------------------- query subsets
#: a ``--subset`` pattern of this prefix names a catalog field instead of a regular expression
VALUES_SUBSET = "values:"


def subset_pattern(pattern: str, catalog: Path) -> str:
    """A ``--subset`` pattern as the regular expression searched in each query: ``values:FIELD`` becomes any value the
    catalog file gives FIELD (e.g. every colour of ``base_colour``) as a whole word or phrase, case-insensitive,
    longer values first; any other pattern stays as it is. :class:`ConfigError` when the catalog has no value there."""
    if not pattern.startswith(VALUES_SUBSET):
        return pattern
    name = pattern[len(VALUES_SUBSET) :].strip()
    values = sorted({v[name].strip().lower() for v in attribute_values(Path(catalog), (name,)).values() if v[name].strip()}, key=lambda s: (-len(s), s))
    if not values:
        raise ConfigError(f"--subset {pattern}: the catalog {catalog} has no value in field {name!r}")
    return r"\b(" + "|".join(re.escape(v) for v in values) + r")\b"


# --------------------------------------------------------------------------- the cached index
def attribute_values(path: Path, fields: Sequence[str] = DIVERSITY_FIELDS) -> dict[str, dict[str, str]]:
    """``{product id: {field: value}}`` of a catalog file (``--attributes-catalog``), the fields that are set."""
    from indexing.catalog import Product, read_catalog

    out: dict[str, dict[str, str]] = {}
    for p in read_catalog(path):
        if isinstance(p, Product):
            vals = {f: str(p.fields[f]) for f in fields if p.fields.get(f) not in (None, "")}
            if vals:
                out[p.id] = vals
    return out


class ListDocs:
    """The documents the diversity metrics read (vectors and :data:`DIVERSITY_FIELDS`), fetched once per id.

    ``fetch(ids, field names) -> {id: source}``; ``attributes``: values that replace the fetched ones
    (:func:`attribute_values`)."""

    def __init__(self, fetch: Callable[[Sequence[str], Sequence[str]], Mapping[str, Mapping[str, Any]]],
                 attributes: Mapping[str, Mapping[str, str]] | None = None):
        self.fetch, self.attributes = fetch, attributes
        self.docs: dict[str, Mapping[str, Any]] = {}

    def need(self, ids: Iterable[str]) -> None:
        todo = sorted({str(i) for i in ids} - set(self.docs))
        for s in range(0, len(todo), 1000):
            chunk = todo[s : s + 1000]
            got = self.fetch(chunk, [F.TEXT_VEC, F.IMAGE_VEC, *DIVERSITY_FIELDS])
            for d in chunk:
                doc = dict(got.get(d) or {})
                if self.attributes is not None:
                    for f in DIVERSITY_FIELDS:
                        doc.pop(f, None)
                    doc.update(self.attributes.get(d, {}))
                self.docs[d] = doc


def diversity_metrics(runs: Sequence[Mapping[str, Sequence[str]]], items: Sequence[EvalItem], docs: ListDocs, *, k: int = DIVERSITY_K) -> dict[str, Any]:
    """``{"ild@k": mean, "distinct@k": {field: mean}}`` over the queries (and the runs) of their top k
    (:func:`rerank.datasets.metrics.ild_at_k` on the indexed ``text_vec`` and raw ``image_vec``, weighted equally whatever the
    diversity step's settings, so that reports compare; :func:`rerank.datasets.metrics.distinct_at_k` of each
    :data:`DIVERSITY_FIELDS` field that some document has). A query a run left out counts as an empty list."""
    tops = [[list(run.get(it.query_id, []))[:k] for it in items] for run in runs]
    docs.need(d for run in tops for top in run for d in top)
    present = [f for f in DIVERSITY_FIELDS if any(doc.get(f) not in (None, "") for doc in docs.docs.values())]
    text = {d: doc.get(F.TEXT_VEC) for d, doc in docs.docs.items()}
    image = {d: doc.get(F.IMAGE_VEC) for d, doc in docs.docs.items()}
    values = {f: {d: doc.get(f) for d, doc in docs.docs.items()} for f in present}
    ild, distinct = [], {f: [] for f in present}
    for run in tops:
        for top in run:
            ild.append(ild_at_k(top, text, image, k) if len(top) > 1 else 0.0)
            for f in present:
                distinct[f].append(distinct_at_k(top, values[f], k) if top else 0)
    return {f"ild@{k}": float(np.mean(ild)) if ild else 0.0, f"distinct@{k}": {f: float(np.mean(v)) if v else 0.0 for f, v in distinct.items()}}


def per_query_metrics(runs: Sequence[Mapping[str, Sequence[str]]], items: Sequence[EvalItem], spec: MetricSpec) -> dict[str, np.ndarray]:
    """``{metric: (len(items),) array}``: each query's metric, the mean over the runs (a query a run left out scores 0),
    in the order of ``items`` (so two systems' vectors are paired query by query)."""
    if not runs or not items:
        return {}
    names = list(query_metrics([], items[0].gains, spec))
    out = {k: np.zeros(len(items), dtype=np.float64) for k in names}
    for run in runs:
        for i, it in enumerate(items):
            for k, v in query_metrics(run.get(it.query_id, []), it.gains, spec).items():
                out[k][i] += v
    return {k: v / len(runs) for k, v in out.items()}


def score_runs(runs: Sequence[Mapping[str, Sequence[str]]], items: Sequence[EvalItem], spec: MetricSpec) -> dict[str, float]:
    """Mean over queries of the per-query means over runs (:func:`per_query_metrics`; with every run covering every
    query this is the mean over runs of the mean over queries)."""
    return {k: float(v.mean()) for k, v in per_query_metrics(runs, items, spec).items()}


def best_baseline(results: Mapping[str, "SystemResult"]) -> str | None:
    """The best first-stage system of ``results`` by NDCG@10 (``System.first_stage``: bm25, knn_text, knn_image,
    hybrid_rrf, hybrid_minmax; ties by name); None when none was evaluated."""
    from rerank.evaluation.systems import SYSTEMS

    first = [r for n, r in results.items() if SYSTEMS.get(n).first_stage]
    if not first:
        return None
    return min(first, key=lambda r: (-r.metrics.get("ndcg@10", 0.0), r.name)).name


def with_statistics(results: Mapping[str, "SystemResult"], *, seed: int) -> tuple[dict[str, "SystemResult"], str | None]:
    """Every system with its 95% intervals of :data:`~rerank.evaluation.stats.STAT_METRICS` over queries and its paired
    test against the best baseline (:func:`best_baseline`), seeded by ``seed`` and the metric (intervals: the same query
    resamples for every system) and the two systems' names (tests)."""
    from dataclasses import replace

    from rerank.evaluation.stats import STAT_METRICS, bootstrap_ci, derive_seed, paired_test

    best = best_baseline(results)
    out: dict[str, SystemResult] = {}
    for name, r in results.items():
        # the same resamples of the queries for every system (common random numbers): equal vectors, equal intervals
        ci = {m: bootstrap_ci(r.per_query[m], seed=derive_seed(seed, "ci", m)) for m in STAT_METRICS if m in r.per_query}
        vs: dict[str, Any] | None = None
        if best is not None:
            b = results[best]
            vs = {"system": best, "is_best_baseline": name == best}
            for m in STAT_METRICS:
                if m in r.per_query and m in b.per_query:
                    vs[m] = paired_test(r.per_query[m], b.per_query[m], seed=derive_seed(seed, "test", name, best, m))
        out[name] = replace(r, ci95=ci, vs_best_baseline=vs)
    return out, best


# --------------------------------------------------------------------------- the harness
def evaluate(
    req: EvalRequest,
    *,
    data_dir: Path,
    indexer: Indexer,
    query_to_image_space: Callable[[np.ndarray], np.ndarray] | None = None,
    search_engine: SearchEngine | None = None,
    hnsw_engine: str | None = None,
) -> EvalReport:
    """Evaluate every system of ``req`` on the same queries; see the module doc for the protocol.

    ``search_engine``: search another engine than the local cache (an ``OpenSearchEngine``): the cached index is
    copied into it (:func:`mirror_index`, HNSW engine ``hnsw_engine``) and every system searches there."""
    req.check()
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    spec = MetricSpec()
    qs = read_queries(req.queries)
    qrels = read_qrels(req.qrels)
    dataset = req.dataset or dataset_name(req.queries)
    info: dict[str, Any] = {"relevance_threshold": spec.threshold, "seed": req.seed}
    if qs.errors or qrels.errors:
        info["input_errors"] = [f"{e.path}:{e.line}: {e.reason}" for e in (qs.errors + qrels.errors)[:20]]
    if req.events is not None:
        ev = read_event_users(req.events)
        info["events"] = {"users": len(ev.products_by_user), "events": ev.events}

    trainable = [s for s in req.systems if SYSTEMS.get(s).trainable]
    behaviour_stats: Path | None = None  # --train-ubi: the log's behaviour statistics, read by the fusion systems
    validation_qrels: Path | None = None  # --train-ubi: the log's validation judgments (the fusion systems' early stopping and verdict)
    label_part: tuple[Path | None, Path | None] = (None, None)  # --train-ubi: the log's label part (judgments, behaviour statistics)
    split_name = req.split
    train_q: list[Query] = []
    valid_q: list[Query] = []
    train_qrels = qrels
    if req.train_queries is not None:
        split_name = "all"
        eval_pool = list(qs.queries)
        tq = read_queries(req.train_queries)
        train_qrels = read_qrels(req.train_qrels)  # type: ignore[arg-type]
        inner = assign(tq.queries, seed=req.seed, fractions=TRAIN_ONLY_SPLIT)
        train_q = [q for q in tq.queries if inner[q.id] == "train"]
        valid_q = [q for q in tq.queries if inner[q.id] == "validation"]
        if Path(req.train_queries).resolve() == Path(req.queries).resolve():
            raise ConfigError("--train-queries is the evaluated --queries file: evaluate on queries the models never saw")
        info["train"] = {"queries": str(req.train_queries), "train": len(train_q), "validation": len(valid_q)}
        if req.train_events is not None:  # the baselines use no history; the fusion systems train on these events
            tev = read_event_users(req.train_events)
            info["train"]["events"] = {"users": len(tev.products_by_user), "events": tev.events}
    else:
        splits = load_or_create_splits(qs.queries, data_dir, name=dataset, seed=req.seed)
        wanted = splits.get(req.split)
        eval_pool = [q for q in qs.queries if q.id in wanted]
        if trainable and req.split in ("train", "validation", "all") and req.train_ubi is None:
            log.warning("evaluating trainable systems on the %r split, which overlaps their training data", req.split)
        train_q = [q for q in qs.queries if q.id in splits.train]
        valid_q = [q for q in qs.queries if q.id in splits.validation]
        info["splits_file"] = splits.path
        info["split_sizes"] = {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)}
        if req.train_ubi is not None:  # learn from the log's behaviour on every query but the evaluated ones; no qrels
            from rerank.datasets.ubi_judgments import write_ubi_judgments

            if req.head_queries is not None:  # the head queries: their behaviour is what the model may learn from
                from rerank.datasets.clicks import normalize_query

                uj = write_ubi_judgments(req.train_ubi, data_dir / "ubi-judgments", exclude=(), model=req.click_model)
                searches = uj.query_searches()
                before = len(eval_pool)
                eval_pool = [q for q in eval_pool if searches.get(normalize_query(q.text), 0) >= req.head_queries]
                info["head_queries"] = {"min_searches": req.head_queries, "queries": len(eval_pool), "of": before,
                                        "note": "evaluated queries with at least min_searches searches in the training log; their searches stay in it"}
                if not eval_pool:
                    raise ConfigError(f"no query of the {split_name!r} split has {req.head_queries} or more searches in {req.train_ubi}")
            else:
                uj = write_ubi_judgments(req.train_ubi, data_dir / "ubi-judgments", exclude=[q.text for q in eval_pool], model=req.click_model)
            behaviour_stats = uj.behaviour
            validation_qrels = uj.validation_qrels
            label_part = (uj.label_part_qrels, uj.label_part_behaviour)
            if req.ubi_labels == "qrels":  # the same queries, split and behaviour columns; a person's grades as labels
                from rerank.datasets.ubi_judgments import write_qrels_by_text

                graded, unlabelled = write_qrels_by_text(uj, qs.queries, qrels.grades, Path(uj.qrels).parent / f"qrels-{file_sha256(req.qrels)[:12]}.tsv")
                uj = dataclasses.replace(uj, qrels=graded)
                validation_qrels = graded
                label_part = (graded, uj.label_part_behaviour)
                info["ubi_labels"] = {"labels": "qrels", "qrels": str(req.qrels), "log_texts_without_qrels": unlabelled}
            tq = read_queries(uj.queries)
            train_qrels = read_qrels(uj.qrels)
            inner = assign(tq.queries, seed=req.seed, fractions=ubi_split(req.ubi_validation_share))
            train_q = [q for q in tq.queries if inner[q.id] == "train"]
            valid_q = [q for q in tq.queries if inner[q.id] == "validation"]
            req = dataclasses.replace(req, train_queries=uj.queries, train_qrels=uj.qrels)
            info["train"] = {"ubi": {**uj.info, "judgments_file": str(uj.qrels)}, "train": len(train_q), "validation": len(valid_q)}

    eval_q, no_rel = eval_queries(eval_pool, qrels, req.gain)
    if req.limit_queries is not None:
        eval_q = sorted(eval_q, key=lambda q: hashlib.sha256(f"{req.seed}:{q.id}".encode()).hexdigest())[: req.limit_queries]
        eval_q.sort(key=lambda q: q.id)
    info["queries_without_positive_gain"] = no_rel
    if not eval_q:
        raise ConfigError(f"no query of the {split_name!r} split has a judged product with a positive gain under --gain {req.gain}")

    # the index and the retriever
    from indexing.encoders import get_text_encoder

    common = dict(text_model=req.text_model, text_backend=req.text_backend, image_model=req.image_model, device=req.device, mapping=req.mapping,
                  attribute_model=req.attribute_model, attribute_threshold=req.attribute_threshold)
    idx = cached_index(req.catalog, req.images_root, data_dir=data_dir, indexer=indexer, **common)
    if search_engine is not None:
        idx = mirror_index(idx, search_engine, mapping=req.mapping, hnsw_engine=hnsw_engine, progress=req.progress)
    info["index"] = {"key": idx.key, "path": str(idx.path), "docs": idx.engine.count(idx.alias), "indexed_failed": idx.summary.get("failed"),
                     "mapping": req.mapping, "attribute_model": req.attribute_model,
                     "engine": getattr(idx.engine, "name", "local"), "name": idx.alias}
    text_enc = get_text_encoder(req.text_model, backend=req.text_backend, device=req.device)
    cfg = RetrievalConfig(top_n=req.top_n, per_list=req.top_n)
    retriever = Retriever(idx.engine, idx.alias, text_encoder=text_enc, query_to_image_space=query_to_image_space, config=cfg)
    items, failed = build_items(retriever, eval_q, qrels, gain=req.gain, mode=req.mode, top_n=req.top_n, progress=req.progress)
    if failed:
        info["first_stage_errors"] = [{"query_id": q, "reason": r} for q, r in failed[:50]]
        info["first_stage_failed_queries"] = len(failed)
    if search_engine is not None and hasattr(idx.engine, "client"):
        if req.mode == "retrieve":  # the cluster's own hybrid fusion (search pipelines) against the client-side one
            from rerank.evaluation.pipeline_check import pipeline_fusion_agreement

            vecs = retriever.encode_queries([it.query for it in items])
            info["pipeline_fusion"] = pipeline_fusion_agreement(idx.engine.client, idx.alias, [it.stage for it in items], vecs, per_list=req.top_n)
        else:
            info["pipeline_fusion"] = "not checked in rerank mode (its lists are filtered to the judged products)"

    fetch = lambda ids: idx.engine.get(idx.alias, list(ids), fields=[F.TITLE, F.BRAND, F.CATEGORY, F.ATTRIBUTES])  # noqa: E731
    ctx = EvalContext(
        mode=req.mode,
        items=items,
        fetch_sources=fetch,
        train_fetch_sources=fetch,
        cache_dir=data_dir / "eval-models",
        model_dirs={k: Path(v) for k, v in req.model_dirs.items()},
        seed=req.seed,
        rerank_depth=req.rerank_depth,
        device=req.device,
        progress=req.progress,
        options={"top_n": req.top_n, **dict(req.options)},
    )
    if trainable:
        t_retriever, t_idx = retriever, idx
        if req.train_catalog is not None and Path(req.train_catalog).resolve() != Path(req.catalog).resolve():
            t_idx = cached_index(req.train_catalog, req.train_images_root, data_dir=data_dir, indexer=indexer, **common)
            t_retriever = Retriever(t_idx.engine, t_idx.alias, text_encoder=text_enc, query_to_image_space=query_to_image_space, config=cfg)
            ctx.train_fetch_sources = lambda ids: t_idx.engine.get(t_idx.alias, list(ids), fields=[F.TITLE, F.BRAND, F.CATEGORY, F.ATTRIBUTES])
        tq_keep, _ = eval_queries(train_q, train_qrels, req.gain)
        vq_keep, _ = eval_queries(valid_q, train_qrels, req.gain)
        ctx.train_items, _ = build_items(t_retriever, tq_keep, train_qrels, gain=req.gain, mode=req.mode, top_n=req.top_n, progress=req.progress, desc="first stage (training)")
        ctx.valid_items, _ = build_items(t_retriever, vq_keep, train_qrels, gain=req.gain, mode=req.mode, top_n=req.top_n, progress=req.progress, desc="first stage (validation)")
        q2i_id = transform_id(query_to_image_space, int(text_enc.dim))
        lists_ran = sorted({n for it in (*ctx.train_items, *ctx.valid_items) for n in it.stage.lists})
        ctx.train_key = _key(
            t_idx.key,
            req.mode,
            req.gain,
            req.top_n,
            sorted(q.id for q in tq_keep),
            sorted(q.id for q in vq_keep),
            file_sha256(req.train_qrels or req.qrels),
            file_sha256(req.train_queries or req.queries),
            q2i_id,  # the knn_image list for text queries (its features) depends on the alignment
            lists_ran,
            *((["ubi", "judged-only"],) if req.train_ubi is not None and req.ubi_unshown == "unknown" else ()),
        )
        if req.train_ubi is not None and req.ubi_unshown == "unknown":  # products the log never showed are unknown, not irrelevant
            ctx.options["train_judged_only"] = True
        info["training"] = {"queries": len(ctx.train_items), "validation_queries": len(ctx.valid_items),
                            "lists": lists_ran, "query_to_image_space": q2i_id}
        if req.train_ubi is not None:  # how much of the first stage the log's judgments cover (the rest trains as irrelevant)
            info["training"]["log_coverage"] = {"train": judged_share(ctx.train_items), "validation": judged_share(ctx.valid_items)}
        eval_queries_by_id = {q.id: q for q in eval_q}

        def rebuild_stages(q2i: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, FirstStage]:
            again, _ = build_items(Retriever(idx.engine, idx.alias, text_encoder=text_enc, query_to_image_space=q2i, config=cfg),
                                   [eval_queries_by_id[it.query_id] for it in items], qrels, gain=req.gain, mode=req.mode,
                                   top_n=req.top_n, progress=req.progress, desc="first stage (with the model's alignment)")
            return {it.query_id: it.stage for it in again}

        if req.train_catalog is not None and Path(req.train_catalog).resolve() != Path(req.catalog).resolve():
            t_spec = DatasetSpec(Path(req.train_catalog), Path(req.train_queries or req.queries), Path(req.train_qrels or req.qrels),
                                 gain=req.gain, events=req.train_events, images_root=req.train_images_root, name=f"{dataset}-train", mode=req.mode)
        elif req.train_queries is not None:
            t_spec = DatasetSpec(Path(req.catalog), Path(req.train_queries), Path(req.train_qrels),  # type: ignore[arg-type]
                                 gain=req.gain, events=req.train_events or req.events, images_root=req.images_root,
                                 name=f"{dataset}-ubi-{req.click_model}" if req.train_ubi is not None else f"{dataset}-train", mode=req.mode,
                                 judged_only=req.train_ubi is not None and req.ubi_unshown == "unknown",
                                 split=ubi_split(req.ubi_validation_share) if req.train_ubi is not None else TRAIN_ONLY_SPLIT,
                                 labels_from_log=req.train_ubi is not None, validation_qrels=validation_qrels,
                                 label_part_qrels=label_part[0], label_part_behaviour=label_part[1])
        else:
            t_spec = DatasetSpec(Path(req.catalog), Path(req.queries), Path(req.qrels), gain=req.gain, events=req.events,
                                 images_root=req.images_root, name=dataset, mode=req.mode)
        ctx.fusion = FusionInputs(
            data_dir=data_dir,
            indexer=indexer,
            dataset=t_spec,
            encode_queries=retriever.encode_queries,
            fetch_fields=lambda ids, names: idx.engine.get(idx.alias, list(ids), fields=list(names)),
            rebuild_stages=rebuild_stages,
            events=req.events,
            also=tuple(req.train_also),
            behaviour_stats=behaviour_stats,
            text_model=req.text_model,
            text_backend=req.text_backend,
            image_model=req.image_model,
            mapping=req.mapping,
            attribute_model=req.attribute_model,
            attribute_threshold=req.attribute_threshold,
            top_n=req.top_n,
        )

    patterns = {n: subset_pattern(rx, Path(req.catalog)) for n, rx in req.subsets.items()}
    subset_items = {n: [it for it in items if re.search(rx, it.query, flags=re.IGNORECASE)] for n, rx in patterns.items()}
    if subset_items:
        info["subsets"] = {n: {"pattern": req.subsets[n], **({"regex": patterns[n]} if patterns[n] != req.subsets[n] else {}), "queries": len(v)}
                           for n, v in subset_items.items()}
    if req.train_also:
        info["train_also"] = [d.name or str(d.queries) for d in req.train_also]
    values = [parse_diversity(v, what="--diversity") for v in req.diversity]
    labels: list[str | None] = [diversity_label(v) for v in values] or [None]
    dcfg = req.diversity_config or DiversityConfig()
    attrs = attribute_values(Path(req.attributes_catalog)) if req.attributes_catalog is not None else None
    list_docs = ListDocs(lambda ids, names: idx.engine.get(idx.alias, list(ids), fields=list(names)), attrs)
    info["diversity_metrics"] = {
        "k": DIVERSITY_K, "fields": list(DIVERSITY_FIELDS),
        "ild": f"mean pairwise 1 - similarity of the top {DIVERSITY_K}: the mean of the text_vec and the raw image_vec cosines "
               "(clipped to [0, 1]; a pair without a photo: text alone; a product without vectors is at distance 1)",
        "attributes": str(req.attributes_catalog) if req.attributes_catalog is not None else "the evaluated index (empty values not counted)",
    }
    if values:
        from dataclasses import asdict

        info["diversity_step"] = {"lambdas": labels, "config": asdict(dcfg),
                                  "note": "the rerank call's diversity step re-orders the fusion systems' scores; the other systems are "
                                          "the same at every lambda"}
    results: dict[str | None, dict[str, SystemResult]] = {lab: {} for lab in labels}
    skipped: dict[str, str] = {}
    for name in req.systems:
        ts = time.perf_counter()
        system = SYSTEMS.create(name)
        try:
            if values and hasattr(system, "diversified_runs"):
                by = dict(zip(labels, system.diversified_runs(ctx, values, dcfg)))
            else:
                runs = system.runs(ctx)
                by = {lab: (runs, None) for lab in labels}
        except NotApplicable as e:
            skipped[name] = str(e)
            log.warning("system %s skipped: %s", name, e)
            continue
        seconds = time.perf_counter() - ts
        same = len({id(r) for r, _ in by.values()}) == 1
        div_once = diversity_metrics(next(iter(by.values()))[0], items, list_docs) if same else None
        for lab, (runs, applied) in by.items():
            pq = per_query_metrics(runs, items, spec)
            m = {k: float(v.mean()) for k, v in pq.items()}
            subs = {n: score_runs(runs, v, spec) for n, v in subset_items.items() if v}
            dm = dict(div_once) if div_once is not None else diversity_metrics(runs, items, list_docs)
            if applied is not None:
                dm["diversity"] = applied
            results[lab][name] = SystemResult(name, m, len(runs), seconds, ctx.notes.get(name), subs, dm, pq, serving=ctx.serving.get(name))
            log.info("%s%s: %s", name, "" if lab is None else f" (diversity {lab})", {k: round(v, 4) for k, v in m.items()})
    if req.mode == "rerank":
        info["note"] = ("rerank mode: each system reorders the judged products of a query (judged@10 is 1 whenever a query has 10 "
                        "or more; recall@100 is 1 unless a query has over 100 judged products)")
    else:
        info["note"] = (f"retrieve mode: single lists and hybrids rank the whole catalog (top {req.top_n}); random, lambdamart, "
                        f"the fusion systems and cross_encoder reorder the hybrid_rrf top {req.top_n} (cross_encoder its first {req.rerank_depth}); "
                        "unjudged products count as irrelevant, judged@10 says how many of the top 10 were judged")
    if ctx.artifacts:
        info["artifacts"] = dict(ctx.artifacts)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    best: dict[str | None, str | None] = {}
    for lab in labels:
        results[lab], best[lab] = with_statistics(results[lab], seed=req.seed)
    reports = {lab: EvalReport(dataset, req.mode, len(items), split_name, req.gain, results[lab], skipped, info, lab, best_baseline=best[lab])
               for lab in labels}
    first = reports[labels[0]]
    if len(labels) > 1:
        first = EvalReport(dataset, req.mode, len(items), split_name, req.gain, results[labels[0]], skipped, info, labels[0],
                           {str(lab): r for lab, r in reports.items()}, best_baseline=best[labels[0]])
    return first


__all__ = ["CachedIndex", "DIVERSITY_FIELDS", "EvalReport", "EvalRequest", "ListDocs", "MODES", "SystemResult", "attribute_values", "build_items", "subset_pattern",
           "best_baseline", "cached_index", "dataset_name", "diversity_metrics", "evaluate", "index_key", "per_query_metrics", "score_runs",
           "statistics_info", "transform_id", "with_statistics"]
