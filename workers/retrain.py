"""The retraining loop: retrain from the history store's UBI log when enough new behaviour arrived, judge the
candidate against the serving model on held-out behaviour, promote it only when it is better by the margin.

:func:`retrain` is what the Celery task ``fusionrank.model.retrain`` (admin queue, :mod:`workers.model_tasks`) and
``fusionrank model retrain`` run:

1. count the UBI events in the store; fewer than ``retrain_min_new_events`` since the last retraining (the ledger
   of :class:`rerank.model.registry.ModelRegistry` records the count each run saw): ``skipped``;
2. read the log, build sessions, split them by query (:mod:`rerank.training.loop`: the held-out queries are never
   trained on), fit the click model on the training part (spam capped) and train the fusion ranker on its
   implicit judgments against ``retrain_catalog`` (validated, early stopping and the verdict, on the same click model's
   judgments shrunk harder: :func:`rerank.datasets.ubi_judgments.log_judgments`), reading the behaviour features of the same searches
   (:mod:`rerank.model.behaviour`; the artifact carries them; a training query that reads its own behaviour is labelled by
   the log's label part and reads its columns from its other searches, as in ``fusionrank train --from-ubi``); the
   artifact becomes a registry version;
3. estimate both models on the held-out part (and on ``qrels``, when given); promote (the registry's ``current``
   link moves, the service follows it) or record the refusal with its numbers. Every version is kept.

One run at a time per registry (an exclusive ``flock``; a second one returns ``busy``). A redelivered task
(``acks_late``) after a finished run sees no new events and skips; after a crash mid-training it trains again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import time
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any, Iterator, Mapping

from indexing.errors import ConfigError

log = logging.getLogger(__name__)


def registry_of(settings: Any) -> Any:
    from rerank.model.registry import ModelRegistry

    d = Path(settings.effective_model_dir)
    return ModelRegistry(d.parent, link=d.name)


def events_at_last_training(registry: Any) -> int:
    """The store's UBI event count the last retraining saw (0 before the first)."""
    for e in reversed(registry.ledger()):
        if e.get("retrain") and "events" in e["retrain"]:
            return int(e["retrain"]["events"])
    return 0


@contextlib.contextmanager
def _one_at_a_time(root: Path) -> Iterator[bool]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".retrain.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_config(settings: Any, options: Mapping[str, Any] | None) -> Any:
    """The retrain task's :class:`rerank.training.ranker.TrainConfig`: the settings' models and budget, plus ``options``
    (TrainConfig fields, e.g. ``{"epochs": 10, "d_model": 32}``; an unknown name is refused with the valid ones)."""
    from rerank.training.ranker import TrainConfig

    valid = {f.name for f in dc_fields(TrainConfig)}
    bad = sorted(set(options or {}) - valid)
    if bad:
        raise ConfigError(f"unknown training option(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    base = dict(device=settings.device, text_model=settings.text_model, text_backend=settings.text_backend,
                image_model=settings.image_model, mapping=settings.mapping, max_minutes=settings.retrain_max_minutes, threads=1)
    return TrainConfig(**{**base, **dict(options or {})})


def _reranker(idx: Any, model_dir: Path | None, text: Any, settings: Any) -> Any:
    """A reranker over the evaluation index: the model at ``model_dir``, or the first-stage order (noop) for None."""
    from rerank.model.artifact import load_artifact
    from rerank.reranker import Reranker

    if model_dir is None:
        return Reranker.noop(idx.engine, idx.alias, text_encoder=text, budget_ms=600_000)
    art = load_artifact(model_dir, mapping=idx.engine.get_mapping(idx.alias), text_model_id=text.model_id, device=settings.device)
    image = None
    if art.image_encoder is not None:
        from indexing.encoders import get_image_encoder

        image = get_image_encoder(settings.image_model, device=settings.device)
    # no budget to fail open on (an estimate, not a request), the torch runtime (no export per run)
    return Reranker(idx.engine, idx.alias, art, text_encoder=text, image_encoder=image, budget_ms=600_000, model_runtime="torch",
                    overlap_encode=False)


def _search_fn(r: Any):
    return lambda q: r.search(q, size=10).ids


def read_qrels_judgments(queries: Path, qrels: Path) -> dict[str, dict[str, float]]:
    """``{query text: {product: grade}}`` of a queries TSV and TREC qrels."""
    from rerank.datasets.data import read_qrels, read_queries

    qs = read_queries(queries)
    qr = read_qrels(qrels)
    out: dict[str, dict[str, float]] = {}
    for q in qs.queries:
        g = qr.for_query(q.id)
        if g:
            out[q.text] = {d: float(v) for d, v in g.items()}
    return out


def retrain(settings: Any, *, force: bool = False, queries: Path | None = None, qrels: Path | None = None,
            options: Mapping[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """One turn of the loop (see the module doc); a JSON-friendly summary whose ``status`` is ``skipped``, ``busy``,
    ``promoted`` or ``refused``."""
    from rerank.datasets import clicks as C
    from rerank.datasets.ubi_judgments import VALIDATION_PRIOR_STRENGTH, judgments_from_sessions, log_judgments
    from rerank.history import HistoryStore
    from rerank.training.loop import decide, estimate, paired, split_sessions_by_query, write_judgments

    if (queries is None) != (qrels is None):
        raise ConfigError("queries and qrels go together")
    t0 = time.perf_counter()
    reg = registry_of(settings)
    cfg = train_config(settings, options)
    catalog, images_root = settings.retrain_inputs()
    if not Path(catalog).is_file():
        raise ConfigError(f"retrain catalog not found: {catalog}")
    qrels_judg = read_qrels_judgments(queries, qrels) if queries is not None else None
    with _one_at_a_time(reg.root) as mine:
        if not mine:
            return {"status": "busy", "reason": f"another retraining holds {reg.root / '.retrain.lock'}"}
        with HistoryStore(settings.effective_sql_url) as store:
            n_events = store.count_rows("ubi_events")
            since = events_at_last_training(reg)
            new = n_events - since
            base = {"events": n_events, "new_events": new, "threshold": settings.retrain_min_new_events, "serving_version": reg.current()}
            if not force and new < settings.retrain_min_new_events:
                return {"status": "skipped", **base, "reason": f"{new} new UBI events since the last retraining, "
                                                               f"{settings.retrain_min_new_events} needed"}
            ubi_queries, ubi_events = store.ubi_log()
        sessions, counts = C.sessions_from_log(ubi_queries, ubi_events)
        texts: dict[str, str] = {}
        for q in ubi_queries:
            texts.setdefault(C.normalize_query(q.user_query), q.user_query)
        train_s, held_s = split_sessions_by_query(sessions, settings.retrain_holdout)
        if not train_s or not held_s:
            raise ConfigError(f"the log has {len(train_s)} training and {len(held_s)} held-out searches; both are needed "
                              f"(retrain_holdout {settings.retrain_holdout})")
        work = Path(settings.data_dir) / "retrain" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        work.mkdir(parents=True, exist_ok=True)
        # the candidate reads the behaviour of the searches it trains on (never the held-out queries')
        # validated (early stopping, the verdict) on the same click model's judgments shrunk harder, as the held-out estimate
        # and, as `fusionrank train --from-ubi` does, the log's label part: a training query that reads its own behaviour is
        # labelled by half of its searches and reads its columns from the other half (TrainConfig.behaviour_label_part)
        label_part_stats = work / "label-part-behaviour.json.gz"
        lj = log_judgments(train_s, model=settings.retrain_click_model, behaviour_out=work / "behaviour.json.gz",
                           label_part_out=label_part_stats)
        judg, jinfo = lj.train, lj.info
        cfg = dataclasses.replace(cfg, behaviour_stats=work / "behaviour.json.gz")
        held_judg, hinfo = judgments_from_sessions(held_s, model=settings.retrain_click_model, prior_strength=VALIDATION_PRIOR_STRENGTH)
        qf, rf = write_judgments(judg, texts, work / "judgments")
        _, vf = write_judgments(lj.validation, texts, work / "validation-judgments")
        _, lpf = write_judgments(lj.label_part or {}, texts, work / "label-part-judgments")
        summary: dict[str, Any] = {
            **base, "log": counts,
            "train": {"sessions": len(train_s), "queries": len(judg), "judgments": sum(len(v) for v in judg.values()),
                      "spam_capping": jinfo["spam_capping"], "click_model": settings.retrain_click_model,
                      "label_part": jinfo.get("label_part")},
            "heldout": {"sessions": len(held_s), "queries": len(held_judg), "share": settings.retrain_holdout,
                        "spam_capping": hinfo["spam_capping"]},
            "margin": settings.retrain_margin,
        }

        # train
        from rerank.training.ranker import DatasetSpec, train_ranker
        from workers.jobs import run_index_job

        def indexer(engine, job):
            return run_index_job(engine, settings, job, via="inline", progress=progress)

        # as `fusionrank train --from-ubi` trains on a log (the held-out share above is the test)
        ds = DatasetSpec.from_log(Path(catalog), qf, rf, images_root=Path(images_root), name="ubi-store", validation_qrels=vf,
                                  label_part_qrels=lpf, label_part_behaviour=label_part_stats)
        tt = time.perf_counter()
        res = train_ranker([ds], out=work / "candidate", data_dir=settings.data_dir, indexer=indexer, config=cfg)
        version = reg.add(res.artifact, move=True)
        summary["version"] = version
        summary["train"].update({"seconds": round(time.perf_counter() - tt, 1),
                                 "best_validation_ndcg@10": res.report.get("best_validation_ndcg@10"),
                                 # how much of the first stage the log judged (grows only where answers explore: docs/behaviour.md)
                                 "log_coverage": ((res.report.get("datasets") or {}).get(ds.name) or {}).get("log_coverage"),
                                 "serving": (res.report.get("serving") or {}).get("policy")})

        # evaluate on the held-out behaviour (and the qrels)
        from indexing.encoders import get_text_encoder
        from rerank.evaluation.harness import cached_index

        te = time.perf_counter()
        idx = cached_index(Path(catalog), Path(images_root), data_dir=Path(settings.data_dir), indexer=indexer, text_model=cfg.text_model,
                           text_backend=cfg.text_backend, image_model=cfg.image_model, device=cfg.device, mapping=cfg.mapping)
        text = get_text_encoder(cfg.text_model, backend=cfg.text_backend, device=cfg.device)
        serving_version = reg.current()
        try:
            cand = _reranker(idx, reg.path(version), text, settings)
            serv = _reranker(idx, reg.path(serving_version) if serving_version else None, text, settings)
        except Exception as e:
            summary.update(status="refused", reason=f"could not load a model over the evaluation index: {type(e).__name__}: {e}")
            reg.record({"action": "refuse", "version": version, "reason": summary["reason"], "retrain": {"events": n_events}})
            summary["seconds"] = round(time.perf_counter() - t0, 1)
            return summary
        judged = {texts.get(q, q): g for q, g in held_judg.items()}
        evals: dict[str, Any] = {}
        comparisons: dict[str, Any] = {}
        for name, js in (("log", judged), ("qrels", qrels_judg)):
            if js is None:
                continue
            ec, es = estimate(_search_fn(cand), js), estimate(_search_fn(serv), js)
            comparisons[name] = paired(ec, es)
            evals[name] = {"candidate": ec.to_dict(), "serving": es.to_dict(), **comparisons[name]}
        for r in (cand, serv):
            r.close()
        promote, why = decide(comparisons, settings.retrain_margin)
        summary["evaluation"] = {**evals, "against": serving_version or "first stage (no model serving)",
                                 "seconds": round(time.perf_counter() - te, 1)}
        summary["reason"] = why
        entry = {"version": version, "reason": f"retrain: {why}", "evaluation": summary["evaluation"],
                 "retrain": {"events": n_events, "train_sessions": len(train_s), "heldout_sessions": len(held_s),
                             "log_coverage": summary["train"]["log_coverage"]}}
        if promote:
            reg.promote(version, reason=entry["reason"], evaluation=entry["evaluation"])
            reg.record({"action": "retrain", "decision": "promoted", **entry})
            summary["status"] = "promoted"
        else:
            reg.record({"action": "retrain", "decision": "refused", **entry})
            summary["status"] = "refused"
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        log.info("retrain: %s %s: %s", summary["status"], version, why)
        return summary


__all__ = ["events_at_last_training", "read_qrels_judgments", "registry_of", "retrain", "train_config"]
