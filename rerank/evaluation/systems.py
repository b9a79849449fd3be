"""The baseline systems of the harness, registered by explicit name (``SYSTEMS``).

Every system sees the same :class:`EvalItem` s (one per evaluated query: its gains, its first-stage
lists and its *pool*) and returns one or more *runs* (``{query_id: ranked ids}``); metrics are
averaged over runs (``random`` returns five seeded runs, the others one).

The pool is what a system may reorder, identical for every system:

* ``rerank`` mode: the judged products of the query (ESCI task-1 style). The first-stage lists ran
  restricted to exactly those products (a term filter on the product id), so BM25 and kNN scores are
  the engine's own. A judged product a list did not return (no term match, no photo, not indexed)
  goes after the ones it did, in id order.
* ``retrieve`` mode: single-list systems rank the whole catalog (their own top ``per_list``);
  hybrids fuse the lists; ``random``, ``lambdamart`` and ``cross_encoder`` reorder the ``hybrid_rrf``
  top N (the same candidates for all three).

Trainable systems (``lambdamart``, ``cross_encoder``) are trained on :attr:`EvalContext.train_items`
(the training split, or the ``--train-*`` files), validated on :attr:`EvalContext.valid_items`, and
cached by a content hash of what they were trained on (:mod:`rerank.evaluation.trainers`); the hash
includes the first-stage lists that ran and an identifier of ``query_to_image_space`` (the knn_image
list for text queries), so a model fitted without a list's features is never reused with it.

The fusion systems (``fusion``, the ablations ``fusion_no_image`` / ``fusion_no_history`` /
``fusion_text_only`` and one per strategy ``fusion_concat`` / ``fusion_weighted`` /
``fusion_attention``) train the :class:`~rerank.model.ranker.FusionRanker` with :func:`rerank.training.ranker.train_ranker`
on the same training split (:class:`FusionInputs`), one training per distinct config, cached under
``<data_dir>/eval-models/fusion-<key>/`` (``fusion`` and ``fusion_attention`` share one).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from indexing.registry import Registry
from mappings import DEFAULT_MAPPING
from rerank.retrieval.retriever import BM25, KNN_IMAGE, KNN_TEXT, LISTS, Candidate, FirstStage, fuse_first_stage
from rerank.datasets.pools import EvalItem, candidates_for_pool  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

Run = dict[str, list[str]]


class NotApplicable(Exception):
    """The system cannot run on this dataset/mode (e.g. knn_image with text queries and no alignment)."""


@dataclass
class EvalContext:
    """What systems may use: the engine/index (texts by id), the items, training items, where to cache."""

    mode: str
    items: Sequence[EvalItem]
    train_items: Sequence[EvalItem] = ()
    valid_items: Sequence[EvalItem] = ()
    fetch_sources: Callable[[Sequence[str]], Mapping[str, Mapping[str, Any]]] | None = None
    train_fetch_sources: Callable[[Sequence[str]], Mapping[str, Mapping[str, Any]]] | None = None
    cache_dir: Path | None = None
    train_key: str = ""  # content hash of the training inputs (files + index + mode)
    model_dirs: Mapping[str, Path] = field(default_factory=dict)  # --model overrides
    seed: int = 13
    rerank_depth: int = 100  # retrieve mode: how deep the cross-encoder reorders the pool
    device: str = "auto"
    progress: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # per system, shown in the report
    serving: dict[str, dict[str, Any]] = field(default_factory=dict)  # per fusion system: what its artifact serves (rerank.safe)
    artifacts: dict[str, str] = field(default_factory=dict)  # per system: the model directory it scored with
    fusion: "FusionInputs | None" = None  # what the fusion systems need beyond the items (set by the harness)


@dataclass(frozen=True)
class FusionInputs:
    """What the harness hands the fusion systems: how to train (``rerank.training.ranker.train_ranker`` on
    ``dataset``: the harness's training split, or the ``--train-*`` files) and how to score its items.

    ``encode_queries(texts) -> (n, Dt)``; ``fetch_fields(ids, field_names) -> {id: source}`` from the
    evaluated index; ``rebuild_stages(query_to_image_space) -> {query_id: FirstStage}`` re-runs the
    first stage of the evaluated queries with a model's own alignment (so its ``knn_image`` features
    are the ones it was trained on); ``events``: the evaluated queries' events file (user histories)."""

    data_dir: Path
    indexer: Callable[[Any, Any], Any]
    dataset: Any  # rerank.training.ranker.DatasetSpec
    encode_queries: Callable[[Sequence[str]], Any]
    fetch_fields: Callable[[Sequence[str], Sequence[str]], Mapping[str, Mapping[str, Any]]]
    rebuild_stages: Callable[[Any], Mapping[str, FirstStage]] | None = None
    events: Path | None = None
    text_model: str = "minilm"
    text_backend: str = "torch"
    image_model: str = "efficientnet_lite0"
    mapping: str = DEFAULT_MAPPING
    attribute_model: str | None = None
    attribute_threshold: float = 0.8
    top_n: int = 200
    also: tuple[Any, ...] = ()  # more DatasetSpecs the fusion systems train on (their train/validation splits)
    #: behaviour statistics of the training log (--train-ubi; rerank.model.behaviour): the fusion systems read them
    #: (all but ``fusion_no_behaviour``)
    behaviour_stats: Path | None = None


class System:
    name: str = ""
    trainable: bool = False
    #: a first-stage order (a single list or a hybrid of them): a candidate for the report's best baseline
    first_stage: bool = False

    def runs(self, ctx: EvalContext) -> list[Run]:  # pragma: no cover - interface
        raise NotImplementedError


SYSTEMS: Registry[System] = Registry("evaluation system")
DEFAULT_SYSTEMS = ("random", "bm25", "knn_text", "knn_image", "hybrid_minmax", "hybrid_rrf", "lambdamart", "cross_encoder")


# --------------------------------------------------------------------------- helpers
def complete(order: Sequence[str], pool: Sequence[str]) -> list[str]:
    """``order`` (ids in the pool, first occurrence) then the rest of the pool in id order."""
    pool_set = set(pool)
    seen: set[str] = set()
    out = []
    for d in order:
        if d in pool_set and d not in seen:
            seen.add(d)
            out.append(d)
    out.extend(sorted(pool_set - seen))
    return out


# --------------------------------------------------------------------------- random
@SYSTEMS.register("random")
class RandomSystem(System):
    """A seeded random order of the pool; five seeds, metrics averaged."""

    name = "random"
    seeds = (0, 1, 2, 3, 4)

    def runs(self, ctx: EvalContext) -> list[Run]:
        out = []
        for s in self.seeds:
            run: Run = {}
            for it in ctx.items:
                ids = sorted(it.pool)
                random.Random(f"{ctx.seed}:{s}:{it.query_id}").shuffle(ids)
                run[it.query_id] = ids
            out.append(run)
        return out


# --------------------------------------------------------------------------- single lists
class _ListSystem(System):
    list_name = ""
    first_stage = True

    def runs(self, ctx: EvalContext) -> list[Run]:
        ran = [it for it in ctx.items if self.list_name in it.stage.lists]
        if not ran:
            reasons = {it.stage.skipped.get(self.list_name, "") for it in ctx.items}
            raise NotApplicable(f"the {self.list_name} list ran for no query ({'; '.join(sorted(r for r in reasons if r)) or 'no queries'})")
        run: Run = {}
        for it in ctx.items:
            hits = it.stage.lists.get(self.list_name, ())
            order = [d for d, _ in sorted({h.id: h.score for h in hits}.items(), key=lambda kv: (-kv[1], kv[0]))]
            run[it.query_id] = complete(order, it.pool) if ctx.mode == "rerank" else order
        if len(ran) < len(ctx.items):
            ctx.notes[self.name] = f"the {self.list_name} list ran for {len(ran)} of {len(ctx.items)} queries"
        return [run]


@SYSTEMS.register("bm25")
class BM25System(_ListSystem):
    name, list_name = "bm25", BM25


@SYSTEMS.register("knn_text")
class KnnTextSystem(_ListSystem):
    name, list_name = "knn_text", KNN_TEXT


@SYSTEMS.register("knn_image")
class KnnImageSystem(_ListSystem):
    name, list_name = "knn_image", KNN_IMAGE


# --------------------------------------------------------------------------- hybrids
class _HybridSystem(System):
    method = ""
    first_stage = True

    def runs(self, ctx: EvalContext) -> list[Run]:
        run: Run = {}
        opts = dict(ctx.options.get(f"{self.name}_options", {}))
        for it in ctx.items:
            top_n = None if ctx.mode == "rerank" else ctx.options.get("top_n", 200)
            cs = fuse_first_stage(it.stage, method=self.method, lists=LISTS, top_n=top_n, **opts)
            run[it.query_id] = complete(cs.ids, it.pool) if ctx.mode == "rerank" else cs.ids
        return [run]


@SYSTEMS.register("hybrid_rrf")
class HybridRRF(_HybridSystem):
    name, method = "hybrid_rrf", "rrf"


@SYSTEMS.register("hybrid_minmax")
class HybridMinMax(_HybridSystem):
    name, method = "hybrid_minmax", "minmax"


# --------------------------------------------------------------------------- trained
def _rerank_pool(ctx: EvalContext, it: EvalItem, scores: Mapping[str, float], depth: int | None) -> list[str]:
    """Pool order by model score (ties by id); in retrieve mode only the first ``depth`` are reordered."""
    base = [c.id for c in it.pool_candidates.candidates]
    head, tail = (base, []) if depth is None else (base[:depth], base[depth:])
    head = sorted(head, key=lambda d: (-scores[d], d))
    return head + tail


@SYSTEMS.register("lambdamart")
class LambdaMART(System):
    """LightGBM lambdarank on :func:`rerank.retrieval.signals.first_stage_features`, trained on the training split."""

    name, trainable = "lambdamart", True

    def runs(self, ctx: EvalContext) -> list[Run]:
        from rerank.evaluation.trainers import LambdaMARTModel

        model = LambdaMARTModel.for_context(ctx)
        run: Run = {}
        for it in ctx.items:
            scores = model.score(it.pool_candidates.candidates)
            run[it.query_id] = _rerank_pool(ctx, it, dict(zip(it.pool_candidates.ids, scores)), None)
        return [run]


@SYSTEMS.register("cross_encoder")
class CrossEncoderSystem(System):
    """all-MiniLM-L6-v2 fine-tuned as a cross-encoder on the training split (no pretrained one exists offline)."""

    name, trainable = "cross_encoder", True

    def runs(self, ctx: EvalContext) -> list[Run]:
        from rerank.evaluation.trainers import CrossEncoderModel, doc_text

        model = CrossEncoderModel.for_context(ctx)
        depth = None if ctx.mode == "rerank" else ctx.rerank_depth
        pairs: list[tuple[str, str, str]] = []  # (query_id, doc id, doc text)
        texts: dict[str, str] = {}
        need = sorted({d for it in ctx.items for d in (list(it.pool_candidates.ids)[:depth] if depth else it.pool)})
        assert ctx.fetch_sources is not None
        for chunk in range(0, len(need), 1000):
            srcs = ctx.fetch_sources(need[chunk : chunk + 1000])
            for d in need[chunk : chunk + 1000]:
                texts[d] = doc_text(srcs.get(d))
        queries = {it.query_id: it.query for it in ctx.items}
        for it in ctx.items:
            ids = list(it.pool_candidates.ids)[:depth] if depth else list(it.pool)
            pairs.extend((it.query_id, d, texts[d]) for d in ids)
        scores = model.score([queries[q] for q, _, _ in pairs], [t for _, _, t in pairs], progress=ctx.progress)
        by_q: dict[str, dict[str, float]] = {}
        for (q, d, _), s in zip(pairs, scores):
            by_q.setdefault(q, {})[d] = float(s)
        run: Run = {}
        for it in ctx.items:
            run[it.query_id] = _rerank_pool(ctx, it, by_q.get(it.query_id, {}), depth)
        ctx.notes.setdefault(self.name, model.note)
        return [run]


# --------------------------------------------------------------------------- the fusion ranker
@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, restoring the previous count after (on a busy 2-core
    machine 2 threads contend and run 10-100x slower than 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: ``fusion_options`` keys passed to :class:`rerank.training.ranker.TrainConfig` (the rest are refused)
FUSION_TRAIN_OPTIONS = ("loss", "epochs", "batch_size", "lr", "weight_decay", "patience", "max_minutes", "max_train_candidates",
                        "d_model", "hidden", "history_k", "use_colour", "use_intent", "use_attribute_match", "attribute_predictions", "min_epochs",
                        "history_agreement", "behaviour_query_dropout", "behaviour_product_scope", "behaviour_label_part", "seed",
                        "keep_epoch")


def fusion_train_config(ctx: EvalContext, *, strategy: str, use_image: bool, use_history: bool, use_product: bool = True,
                        use_behaviour: bool = True) -> Any:
    """The :class:`rerank.training.ranker.TrainConfig` a fusion system trains with: the harness's seed, top N,
    device and encoders, one torch thread, ``ctx.options["fusion_options"]`` (e.g. ``max_minutes``), and the training
    log's behaviour statistics when there are some and ``use_behaviour``."""
    from indexing.errors import ConfigError
    from rerank.training.ranker import TrainConfig

    opts = dict(ctx.options.get("fusion_options", {}))
    bad = sorted(set(opts) - set(FUSION_TRAIN_OPTIONS))
    if bad:
        raise ConfigError(f"unknown fusion_options {bad}; valid: {', '.join(FUSION_TRAIN_OPTIONS)}")
    fi = ctx.fusion
    assert fi is not None
    seed = int(opts.pop("seed", ctx.seed))  # another training of the same evaluation split: its own init, sampling and train/validation cut
    return TrainConfig(
        strategy=strategy, use_image=use_image, use_history=use_history, use_product=use_product, seed=seed, top_n=fi.top_n,
        device=ctx.device, threads=1, text_model=fi.text_model, text_backend=fi.text_backend, image_model=fi.image_model,
        mapping=fi.mapping, attribute_model=fi.attribute_model, attribute_threshold=fi.attribute_threshold, progress=ctx.progress,
        behaviour_stats=fi.behaviour_stats if use_behaviour else None, **opts,
    )


def fusion_cache_dir(ctx: EvalContext, config: Any) -> Path | None:
    """``<cache_dir>/fusion-<key>``: the key hashes the training inputs (``ctx.train_key``), the events
    file and the whole training config (strategy and ablation flags included), so each ablation and
    strategy is its own training and ``fusion`` / ``fusion_attention`` (the same config) share one."""
    import hashlib
    import json
    from dataclasses import asdict

    if ctx.cache_dir is None:
        return None
    from rerank.datasets.data import file_sha256

    fi = ctx.fusion
    assert fi is not None
    ev = fi.dataset.events
    # without behaviour statistics the behaviour settings change nothing: left out, so earlier cached models still match
    cfg = {k: v for k, v in asdict(config).items() if k != "progress" and not (k.startswith("behaviour") and config.behaviour_stats is None)
           and not (k == "behaviour_product_scope" and v == "all") and not (k == "behaviour_label_part" and not v)
           and not (k == "keep_epoch" and v == "best")}
    # (the settings' values before they were settings are left out: earlier cached models still match)
    also = [[file_sha256(p) if p is not None and Path(p).is_file() else None for p in (d.catalog, d.queries, d.qrels, d.events)]
            + [d.gain, d.mode, str(d.images_root)] for d in fi.also]
    split = [["split", list(fi.dataset.split)]] if getattr(fi.dataset, "split", None) else []  # none: earlier cached models still match
    # labels from a log: validated on its harder-shrunk judgments (models cached before them are trained and judged again)
    vq = getattr(fi.dataset, "validation_qrels", None)
    split += [["labels", "log", file_sha256(vq) if vq is not None else None]] if getattr(fi.dataset, "labels_from_log", False) else []
    lp = getattr(fi.dataset, "label_part_qrels", None)  # read by the behaviour model's training queries that read their own behaviour
    split += [["label_part", file_sha256(lp)]] if cfg.get("behaviour_label_part") and lp is not None else []
    body = json.dumps([ctx.train_key, "fusion", cfg, file_sha256(ev) if ev else None, *([also] if also else []), *split], sort_keys=True, default=str)
    return Path(ctx.cache_dir) / f"fusion-{hashlib.sha256(body.encode()).hexdigest()[:16]}"


class _FusionSystem(System):
    """The trained :class:`~rerank.model.ranker.FusionRanker` (``rerank.training.ranker``), one training per config.

    ``--model NAME=DIR`` scores with a given artifact. Otherwise trained on the harness's training
    split (or the ``--train-*`` files) and cached under ``<data_dir>/eval-models/fusion-<key>/``.
    Scored per query over the pool (rerank mode: the judged products; retrieve mode: the hybrid_rrf top
    N, as lambdamart), with one torch thread."""

    trainable = True
    strategy, use_image, use_history, use_behaviour = "attention", True, True, True

    def artifact(self, ctx: EvalContext) -> Any:
        from indexing.encoders import image_encoder_info, text_encoder_info
        from indexing.errors import ModelArtifactError
        from rerank.model.artifact import CONFIG_FILE, load_artifact
        from rerank.training.ranker import train_ranker

        fi = ctx.fusion
        if fi is None:
            raise NotApplicable("the fusion systems need the harness's training inputs (run them through rerank.evaluation.harness.evaluate)")
        ids = dict(text_model_id=text_encoder_info(fi.text_model, backend=fi.text_backend).model_id,
                   image_model_id=image_encoder_info(fi.image_model).model_id)
        given = ctx.model_dirs.get(self.name)
        if given is not None:
            return load_artifact(given, device=ctx.device, **ids)
        config = fusion_train_config(ctx, strategy=self.strategy, use_image=self.use_image, use_history=self.use_history,
                                     use_behaviour=self.use_behaviour)
        d = fusion_cache_dir(ctx, config)
        if d is not None and (d / CONFIG_FILE).is_file():
            try:
                art = load_artifact(d, device=ctx.device, **ids)
            except ModelArtifactError as e:  # e.g. cached by an older version with another feature layout
                log.warning("%s: the cached model %s cannot be used (%s); training it again", self.name, d, e)
            else:
                log.info("%s: using the cached model %s", self.name, d)
                return art
        if d is None:
            raise NotApplicable("the fusion systems need a cache directory for their trained model")
        with torch_threads(1):
            res = train_ranker([fi.dataset, *fi.also], out=d, data_dir=fi.data_dir, indexer=fi.indexer, config=config)
        log.info("%s trained: best validation NDCG@10 %s (%s)", self.name, res.report.get("best_validation_ndcg@10"), res.report.get("stopped"))
        return load_artifact(d, device=ctx.device, **ids)

    def runs(self, ctx: EvalContext) -> list[Run]:
        run: Run = {}
        for it, scored, _req, _docs, _tiers in self._scored(ctx):
            scores = dict(zip(scored.ids, (float(x) for x in scored.scores)))
            run[it.query_id] = sorted(it.pool, key=lambda d: (-scores.get(d, float("-inf")), d))
        return [run]

    def diversified_runs(self, ctx: EvalContext, lambdas: Sequence[float | str], config: Any = None) -> list[tuple[list[Run], dict[str, Any]]]:
        """The model scored once, then re-ordered by the rerank call's diversity step (:mod:`rerank.diversity`) at each
        lambda (``"auto"`` chosen per query from its words, its candidates' fields and the user's history, as the
        rerank call does); per lambda ``([run], {"lambda_mean", "lambda_min", "lambda_max", "queries_diversified"})``."""
        from rerank.diversity import AUTO, DiversityConfig, choose_lambda, diversify, document_inputs, history_events, stack_rows

        cfg = config or DiversityConfig()
        scored_all = self._scored(ctx)
        out = []
        for lam in lambdas:
            run: Run = {}
            applied: list[float] = []
            for it, scored, req, docs, tiers in scored_all:
                scores = dict(zip(scored.ids, (float(x) for x in scored.scores)))
                base = sorted(it.pool, key=lambda d: (-scores.get(d, float("-inf")), d))
                choice = choose_lambda(lam, query=it.query, docs=[docs.get(i) for i in scored.ids] if lam == AUTO else (),
                                       events=history_events(req.hist_event, req.hist_mask) if lam == AUTO else (), config=cfg)
                applied.append(choice.value)
                row = {d: k for k, d in enumerate(req.ids)}
                if choice.value > 0 and len(base) > 1 and all(d in row for d in base):
                    idx = np.asarray([row[d] for d in base])
                    colour_rows, names = document_inputs([docs.get(i) for i in base], cfg)
                    colour, colour_mask = stack_rows(colour_rows) if colour_rows is not None else (None, None)
                    d = diversify(np.asarray([scores[i] for i in base]), choice.value, text=req.cand_text[idx], text_mask=req.cand_text_mask[idx],
                                  image=req.cand_image[idx], image_mask=req.cand_image_mask[idx], colour=colour, colour_mask=colour_mask, config=cfg,
                                  tiers=None if tiers is None else tiers[idx], colour_names=names)
                    base = [base[k] for k in d.order]
                run[it.query_id] = base
            info = {"lambda_mean": round(float(np.mean(applied)), 4) if applied else 0.0, "lambda_min": min(applied, default=0.0),
                    "lambda_max": max(applied, default=0.0), "queries_diversified": sum(a > 0 for a in applied)}
            out.append(([run], info))
        return out

    def _scored(self, ctx: EvalContext) -> list[tuple[EvalItem, Any, Any, Mapping[str, Mapping[str, Any]], np.ndarray | None]]:
        """Every item scored by the artifact: ``(item, ScoredRequest, RequestFeatures, docs, tiers)``, docs holding the
        candidates' vectors and categorical fields, tiers the intent bound's (``req.ids`` order; None where it put every
        candidate in one tier or the artifact has no bound), which the diversity step keeps."""
        from indexing import fields as F
        from rerank.model.inputs import CAT_FIELDS, HistoryInput, build_request_features, colour_fields
        from rerank.training.ranker import histories, read_events

        art = self.artifact(ctx)
        ctx.artifacts[self.name] = str(art.path)
        fi = ctx.fusion
        assert fi is not None
        spec = art.feature_spec
        cands: dict[str, Sequence[Candidate]] = {it.query_id: it.pool_candidates.candidates for it in ctx.items}
        image_list = "knn_image as the harness ran it" if KNN_IMAGE in spec.lists else "no knn_image features"
        if art.alignment is not None and KNN_IMAGE in spec.lists and fi.rebuild_stages is not None:
            try:
                q2i = art.alignment.query_to_image_space
                q2i(np.zeros(art.alignment.text_dim, dtype=np.float32))
            except Exception as e:  # an MLP alignment has no query map: knn_image stays as the harness ran it
                log.warning("%s: the model's alignment gives no query map (%s); using the harness's first stage", self.name, e)
            else:
                stages = fi.rebuild_stages(q2i)
                image_list = "knn_image re-run with the model's alignment"
                cands = {it.query_id: candidates_for_pool(stages[it.query_id], it.pool).candidates for it in ctx.items}
        hist: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[float, ...]]] = {}
        if fi.events is not None and art.ranker.config.use_history:
            evs, _bad = read_events(fi.events)
            hist = histories(evs, spec.history_k)
        need = {c.id for cs in cands.values() for c in cs}
        for it in ctx.items:
            if it.user_id and it.user_id in hist:
                need.update(hist[it.user_id][0])
        docs: dict[str, Mapping[str, Any]] = {}
        wanted = [F.TEXT_VEC, F.IMAGE_VEC, *CAT_FIELDS, *colour_fields(art.colour if spec.colour else None)]
        if art.intent is not None:  # the intent bound and the attribute agreement inputs read photo-completed values too
            from rerank.model.intent import photo_fields

            wanted += [f for f in photo_fields() if f not in wanted]
        ordered = sorted(need)
        for s in range(0, len(ordered), 1000):
            docs.update(fi.fetch_fields(ordered[s : s + 1000], wanted))
        qvecs = fi.encode_queries([it.query for it in ctx.items]) if ctx.items else []
        project = art.alignment.project if art.alignment is not None else None
        image_dim = art.image_encoder.dim if art.image_encoder is not None else None
        requests = []
        with_history = 0
        hist_items = hist_known = 0  # history products, and those whose categorical fields the model reads
        behaviour = art.behaviour if spec.behaviour else None
        with_behaviour = 0
        for i, it in enumerate(ctx.items):
            h = None
            if it.user_id and it.user_id in hist:
                with_history += 1
                pids, evts, ages = hist[it.user_id]
                h = HistoryInput(pids, tuple((docs.get(p) or {}).get(F.TEXT_VEC) for p in pids),
                                 tuple((docs.get(p) or {}).get(F.IMAGE_VEC) for p in pids), evts, ages, tuple(docs.get(p) for p in pids))
                hist_items += len(pids)
                hist_known += sum(1 for p in pids if any((docs.get(p) or {}).get(f) for f in spec.cat_fields))
            beh = None
            if behaviour is not None:  # the training log's statistics, as the rerank call reads them
                beh = behaviour.features(it.query, [c.id for c in cands[it.query_id]], product_scope=spec.behaviour_product_scope)
                with_behaviour += behaviour.query_searches(it.query) > 0
            requests.append(build_request_features(qvecs[i], list(cands[it.query_id]), docs, spec, history=h, project=project,
                                                   text_dim=art.text_encoder.dim, image_dim=image_dim, colour=art.colour, intent=art.intent,
                                                   behaviour=beh))
        out = []
        serving = art.serving
        ctx.serving[self.name] = serving
        if art.serves_safe_choice:  # what the artifact serves: the signal's order, as the rerank call does
            from rerank.safe import signal_scores

            for it, req in zip(ctx.items, requests):
                out.append((it, _SignalScored(req.ids, signal_scores(serving["signal"], req, spec.lists)), req, docs, None))
        else:
            with torch_threads(1):
                for s in range(0, len(requests), 16):
                    for it, req, scored in zip(ctx.items[s : s + 16], requests[s : s + 16], art.ranker.score_requests(requests[s : s + 16])):
                        tiers = None
                        if art.intent is not None:  # the query-intent bound, as the rerank call serves it
                            from rerank.model.intent import bound_scores

                            tiers = art.intent.assess(req.query, [docs.get(i) for i in req.ids]).tiers
                            scored = dataclasses.replace(scored, scores=bound_scores(scored.scores, tiers))
                            tiers = tiers if tiers.any() else None
                        out.append((it, scored, req, docs, tiers))
        rep = art.report or {}
        served = f"serves the safe choice ({serving['signal']}), not the model" if art.serves_safe_choice else "serves the model"
        if art.intent is not None and not art.serves_safe_choice:
            served += f" bounded by the query's intent ({', '.join(art.intent.config.bound)})"
        ctx.notes.setdefault(self.name, f"fusion ranker ({art.ranker.config.strategy}, {rep.get('ablation', 'given')}), "
                                        f"artifact {art.version} {served}, best validation NDCG@10 {rep.get('best_validation_ndcg@10', 'n/a')}; {image_list}; "
                                        f"{with_history} of {len(ctx.items)} queries with a user history"
                                        + (f" (history attribute agreement: {hist_known} of {hist_items} history products with attributes)"
                                           if getattr(art.ranker.config, "history_agreement", False) and hist_items else "")
                                        + (f"; behaviour features, {with_behaviour} of {len(ctx.items)} queries in the training log" if spec.behaviour else ""))
        return out


@dataclass(frozen=True)
class _SignalScored:
    """A request scored by a first-stage signal (an artifact serving the safe choice): ids and scores, as ScoredRequest."""

    ids: tuple[str, ...]
    scores: np.ndarray


def _fusion(name: str, strategy: str = "attention", use_image: bool = True, use_history: bool = True, doc: str = "",
            use_behaviour: bool = True) -> type[_FusionSystem]:
    cls = type(f"Fusion_{name}", (_FusionSystem,), {"name": name, "strategy": strategy, "use_image": use_image,
                                                    "use_history": use_history, "use_behaviour": use_behaviour, "__doc__": doc})
    SYSTEMS.register(name)(cls)
    return cls


_fusion("fusion", doc="The fusion ranker, attention fusion, every input.")
_fusion("fusion_no_image", use_image=False, doc="Ablation: the same model family retrained without product photos (and the knn_image list).")
_fusion("fusion_no_history", use_history=False, doc="Ablation: retrained without the user's history.")
_fusion("fusion_text_only", use_image=False, use_history=False, doc="Ablation: retrained without photos and without history.")
_fusion("fusion_no_behaviour", use_behaviour=False, doc="Ablation: retrained without the training log's behaviour features (--train-ubi).")
for _s in ("concat", "weighted", "attention"):
    _fusion(f"fusion_{_s}", strategy=_s, doc=f"The fusion ranker with {_s} fusion, every input.")
FUSION_SYSTEMS = ("fusion", "fusion_no_image", "fusion_no_history", "fusion_text_only", "fusion_no_behaviour", "fusion_concat", "fusion_weighted", "fusion_attention")


__all__ = [
    "DEFAULT_SYSTEMS",
    "EvalContext",
    "FUSION_SYSTEMS",
    "FusionInputs",
    "EvalItem",
    "NotApplicable",
    "Run",
    "SYSTEMS",
    "System",
    "candidates_for_pool",
    "complete",
    "fusion_cache_dir",
    "fusion_train_config",
    "torch_threads",
]
