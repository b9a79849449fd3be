"""The evaluation index and the per-query items that training and evaluation share.

* :func:`cached_index`: a catalog indexed once per (catalog, model ids, mapping) into ``<data dir>/eval-cache``
  (LocalEngine), :func:`mirror_index` copies it into another engine;
* :func:`build_items`: the first stage of every query, its pool (``rerank`` mode: the judged products;
  ``retrieve``: the fused top N) and the pool's candidates with every first-stage signal (:class:`EvalItem`).

:mod:`rerank.training` and :mod:`rerank.evaluation` both read these; neither is imported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.engines.base import Filters, SearchEngine
from mappings import DEFAULT_MAPPING
from rerank.datasets.data import Qrels, Query, file_sha256
from rerank.datasets.metrics import has_positive_gain, map_gains
from rerank.retrieval.fusion import ListSignal
from rerank.retrieval.retriever import LISTS, Candidate, CandidateSet, FirstStage, Retriever, fuse_first_stage

log = logging.getLogger(__name__)

EVAL_ALIAS = "eval"
#: the most judged products of one query the rerank mode filters on (the engines' size limit)
MAX_POOL = 10_000

#: indexer(engine, job) -> summary with ``to_dict()`` (``workers.jobs.run_index_job`` bound to settings)
Indexer = Callable[[SearchEngine, Any], Any]


@dataclass(frozen=True)
class EvalItem:
    """One query as every system sees it."""

    query_id: str
    query: str
    user_id: str | None
    gains: Mapping[str, float]  # mapped gains of the judged products
    stage: FirstStage
    pool: tuple[str, ...]  # ids a reranking system may reorder (see module doc)
    pool_candidates: CandidateSet  # the pool with every first-stage signal, in hybrid_rrf order


def judged_share(items: Sequence[EvalItem], k: int = 10) -> dict[str, Any]:
    """How much of the first stage the judgments cover: the share of the ``k`` first candidates (hybrid RRF order) and of
    every candidate of ``items`` that has a judgment. For judgments from a click log, what the log's ranker never showed
    is unjudged and trains as irrelevant: a low share says the log knows little of what this first stage retrieves."""
    top = [c.id in it.gains for it in items for c in it.pool_candidates.candidates[:k]]
    every = [c.id in it.gains for it in items for c in it.pool_candidates.candidates]
    return {f"top{k}": round(sum(top) / len(top), 4) if top else None, "all": round(sum(every) / len(every), 4) if every else None,
            "queries": len(items)}


def candidates_for_pool(stage: FirstStage, pool: Sequence[str], lists: Sequence[str] = LISTS) -> CandidateSet:
    """Every pool id as a candidate, in hybrid RRF order; ids no list returned come last (id order)."""
    fused = fuse_first_stage(stage, method="rrf", lists=lists, top_n=None)
    pool_set = set(pool)
    kept = [c for c in fused.candidates if c.id in pool_set]
    have = {c.id for c in kept}
    absent = {n: ListSignal.absent() for n in lists}
    rest = [Candidate(d, 0.0, 0, absent) for d in sorted(pool_set - have)]
    cands = tuple(Candidate(c.id, c.score, i + 1, c.signals, c.source) for i, c in enumerate(kept + rest))
    return CandidateSet(stage.query, cands, fused.lists, fused.skipped, "rrf", stage.user_id)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CachedIndex:
    engine: SearchEngine
    alias: str
    key: str
    path: Path
    summary: Mapping[str, Any]


def index_key(catalog: Path, images_root: Path | None, *, text_model: str, text_backend: str, image_model: str, mapping: str,
              attribute_model: str | None = None, attribute_threshold: float = 0.8) -> str:
    """The cache key of an evaluation index; the photo attribute model (its weights' id) and completion threshold count
    only when one is given, so the keys of indexes built without one stay as they were."""
    from indexing.encoders import image_encoder_info, text_encoder_info

    parts: list[Any] = [
        file_sha256(catalog),
        str(Path(images_root).resolve()) if images_root else None,
        text_encoder_info(text_model, backend=text_backend).model_id,
        image_encoder_info(image_model).model_id,
        mapping,
    ]
    if attribute_model:
        from indexing.photo_attributes import model_id_of

        parts += [model_id_of(attribute_model), float(attribute_threshold)]
    return _key(*parts)


def cached_index(
    catalog: Path,
    images_root: Path | None,
    *,
    data_dir: Path,
    indexer: Indexer,
    text_model: str = "minilm",
    text_backend: str = "torch",
    image_model: str = "efficientnet_lite0",
    device: str = "auto",
    mapping: str = DEFAULT_MAPPING,
    attribute_model: str | None = None,
    attribute_threshold: float = 0.8,
) -> CachedIndex:
    """The LocalEngine index of ``catalog`` for these models, built on first use and reused after. With a photo
    ``attribute_model`` (and a products-v4 ``mapping``) indexing predicts each photo's attributes and completes the
    catalog's missing values (:mod:`indexing.photo_attributes`), as a shop's index would."""
    from indexing.engines import create_engine
    from indexing.pipeline import IndexJob

    key = index_key(catalog, images_root, text_model=text_model, text_backend=text_backend, image_model=image_model, mapping=mapping,
                    attribute_model=attribute_model, attribute_threshold=attribute_threshold)
    d = Path(data_dir) / "eval-cache" / key
    d.mkdir(parents=True, exist_ok=True)
    engine = create_engine("local", path=d / "engine")
    marker = d / "index.json"
    if marker.is_file():
        summary = json.loads(marker.read_text())
        log.info("using the cached evaluation index %s (%s docs)", d, summary.get("indexed"))
        return CachedIndex(engine, EVAL_ALIAS, key, d, summary)
    job = IndexJob(
        catalog=str(Path(catalog).resolve()),
        index=EVAL_ALIAS,
        images_root=str(Path(images_root).resolve()) if images_root else None,
        text_model=text_model,
        text_backend=text_backend,
        image_model=image_model,
        device=device,
        attribute_model=str(Path(attribute_model).resolve()) if attribute_model else None,
        attribute_threshold=attribute_threshold,
    )
    log.info("indexing %s into the evaluation cache %s (once per catalog and model ids)", catalog, d)
    result = indexer(engine, job)
    summary = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    summary = {**summary, "catalog": str(catalog), "images_root": str(images_root) if images_root else None}
    marker.write_text(json.dumps(summary, indent=1, default=str))
    return CachedIndex(engine, EVAL_ALIAS, key, d, summary)


def mirror_index(local: CachedIndex, target: SearchEngine, *, mapping: str = DEFAULT_MAPPING, hnsw_engine: str | None = None,
                 progress: bool = False, chunk_size: int = 200) -> CachedIndex:
    """The cached evaluation index copied, documents and stored vectors as they are, into another engine (an
    OpenSearch cluster: ``fusionrank eval --engine opensearch``), as index ``fusionrank-eval-<key>``; reused while
    it holds as many documents as the local one. The vectors are the local index's own, so both engines search
    the same numbers and a difference between their reports is the engines' (BM25, HNSW), not the encoders'."""
    import mappings as M
    from indexing.engines.base import BulkAction
    from indexing.errors import EngineError

    name = f"fusionrank-eval-{local.key}"
    n = local.engine.count(local.alias)
    summary = {**dict(local.summary), "engine": getattr(target, "name", type(target).__name__), "index": name}
    if target.index_exists(name):
        if target.count(name) == n:
            log.info("using the evaluation index %s on %s (%d docs)", name, target, n)
            return CachedIndex(target, name, local.key, local.path, summary)
        target.delete_index(name)  # a copy that died half-way
    dims = M.vector_dims(local.engine.get_mapping(local.alias))
    target.create_index(name, M.load_mapping(mapping, text_dim=dims[F.TEXT_VEC], image_dim=dims.get(F.IMAGE_VEC, 1280), hnsw_engine=hnsw_engine))
    docs = local.engine.iter_documents(local.alias)
    if progress:
        from tqdm import tqdm

        docs = tqdm(docs, total=n, desc=f"copying the evaluation index to {name}", unit="doc")
    result = target.bulk(name, (BulkAction.index(str(d[F.ID]), d) for d in docs), chunk_size=chunk_size, refresh=True)
    if result.failed or target.count(name) != n:
        reasons = "; ".join(f"{f.id}: {f.error}" for f in result.failed[:5])
        target.delete_index(name)
        raise EngineError(f"copying the evaluation index to {name} failed ({len(result.failed)} of {n} documents): {reasons}")
    log.info("copied %d documents into %s on %s", n, name, target)
    return CachedIndex(target, name, local.key, local.path, summary)


# --------------------------------------------------------------------------- helpers
def transform_id(fn: Callable[[np.ndarray], np.ndarray] | None, dim: int) -> str | None:
    """A content identifier of a query-vector transform (``query_to_image_space``), for cache keys.

    An :class:`~rerank.model.alignment.Alignment`'s bound method is identified by its weights; any other
    callable by its outputs on fixed seeded probe vectors of dimension ``dim`` (two transforms that
    agree on them are treated as the same). ``None`` (no knn_image list for text queries) stays None."""
    if fn is None:
        return None
    owner = getattr(fn, "__self__", None)
    head = getattr(owner, "head", None)
    if head is not None and hasattr(head, "state_dict"):
        h = hashlib.sha256()
        for k, v in sorted(head.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        return "alignment:" + h.hexdigest()[:16]
    probes = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    try:
        outs = [np.round(np.asarray(fn(p), dtype=np.float64).reshape(-1), 5) for p in probes]
    except Exception as e:  # a transform that cannot take the probes: identify it by name (noted in the key)
        log.warning("query_to_image_space cannot be probed (%s); keying trained models by its name", e)
        return f"callable:{getattr(fn, '__qualname__', repr(fn))}"
    return "probe:" + hashlib.sha256(b"".join(o.tobytes() for o in outs)).hexdigest()[:16]


def dataset_name(queries: Path) -> str:
    """``homedepot`` / ``fashion/bench/dev``: the queries' folder below a ``data`` folder, else its name."""
    parts = Path(queries).resolve().parent.parts
    if "data" in parts:
        i = len(parts) - 1 - parts[::-1].index("data")
        rest = parts[i + 1 :]
        if rest:
            return "/".join(rest)
    return Path(queries).resolve().parent.name


def _gains(qrels: Qrels, qid: str, gain: str) -> dict[str, float]:
    return map_gains(qrels.for_query(qid), gain)


def eval_queries(queries: Sequence[Query], qrels: Qrels, gain: str) -> tuple[list[Query], int]:
    keep = [q for q in queries if has_positive_gain(_gains(qrels, q.id, gain))]
    return keep, len(queries) - len(keep)


def build_items(
    retriever: Retriever,
    queries: Sequence[Query],
    qrels: Qrels,
    *,
    gain: str,
    mode: str,
    top_n: int,
    progress: bool = False,
    desc: str = "first stage",
) -> tuple[list[EvalItem], list[tuple[str, str]]]:
    """First stage for every query (queries encoded in one batch), pools and pool candidates.

    A query whose search fails (an engine error) is recorded as ``(query_id, reason)`` and kept with
    empty lists, so every system still ranks its pool (rerank mode) and the run goes on."""
    from tqdm import tqdm

    from indexing.errors import FusionRankError

    errors: list[tuple[str, str]] = []
    if not queries:
        return [], errors
    vecs = retriever.encode_queries([q.text for q in queries]) if retriever.text_encoder is not None else None
    out = []
    for i, q in enumerate(tqdm(queries, desc=desc, unit="query", disable=not progress, file=sys.stderr)):
        gains = _gains(qrels, q.id, gain)
        qv = vecs[i] if vecs is not None else None
        judged = sorted(gains)[:MAX_POOL]
        try:
            if mode == "rerank":
                filters = Filters(terms={F.ID: judged})
                stage = retriever.first_stage(q.text, query_vector=qv, filters=filters, per_list=len(judged), user_id=q.user_id)
            else:
                stage = retriever.first_stage(q.text, query_vector=qv, per_list=top_n, user_id=q.user_id)
        except FusionRankError as e:
            log.warning("query %s: first stage failed: %s", q.id, e)
            errors.append((q.id, str(e)))
            stage = FirstStage(q.text, {}, {name: f"search failed: {e}" for name in LISTS}, q.user_id)
        if mode == "rerank":
            pool = tuple(judged)
        else:
            pool = tuple(fuse_first_stage(stage, method="rrf", lists=LISTS, top_n=top_n).ids)
        out.append(EvalItem(q.id, q.text, q.user_id, gains, stage, pool, candidates_for_pool(stage, pool)))
    return out, errors
