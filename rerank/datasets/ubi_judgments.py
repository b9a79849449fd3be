"""Implicit judgments from a UBI search log, written as the harness's training files (queries TSV + qrels).

``write_ubi_judgments(log, out_dir, exclude=...)`` reads the log (file or folder), drops every search
whose normalised query text is in ``exclude`` (the evaluated queries: a model is never trained on
their behaviour), caps click spam (:func:`rerank.datasets.clicks.cap_sessions`), fits the chosen click model
and writes its judgments on the 0..2 grade scale (:func:`rerank.datasets.clicks.implicit_judgments`: clicks per
examination; optionally weighted up by add-to-carts and purchases per click). No qrels are read. Beside them it
writes the behaviour statistics of the same searches (``behaviour.json.gz``, :mod:`rerank.model.behaviour`: what a
model trained on these judgments reads), the searches per query text (``searches.json``: head and tail queries), and
the same judgments shrunk harder for validation (``validation-qrels.tsv``, :data:`VALIDATION_PRIOR_STRENGTH`: the gains of
the validation queries, which early stopping and the safe-choice verdict read), and the *label part* of the log
(:data:`LABEL_PART_SHARE` of each query's searches, seeded by search): its judgments (``label-part-qrels.tsv``) and its
behaviour statistics (``label-part-behaviour.json.gz``). A training query that reads its own behaviour columns is
labelled by the label part and reads its columns from the other searches (``DatasetSpec.label_part_qrels`` /
``label_part_behaviour``, ``TrainConfig.behaviour_label_part``): its columns then predict its labels as well as a
query's history predicts its future clicks, not as well as the labels predict themselves.

Click models: ``pbm`` (position-based, EM: debiased; the default), ``sdbn`` (simplified DBN), ``ctr``
(naive: click-through rate, no position correction). On the held-out dev queries ``pbm`` and ``ctr`` trained
fusion rankers 0.0004 NDCG@10 apart on the mean of six trainings each (SE 0.0042: a tie); ``pbm`` predicts held-out
clicks clearly best and corrects a logger that always shows the same order, while on the dev log the naive rate's
judgments order the shown products as close to the hidden grades or closer: see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from rerank.datasets import clicks as C
from rerank.history.ubi import read_log, ubi_files

log = logging.getLogger(__name__)

DEFAULT_CLICK_MODEL = "pbm"


@dataclass(frozen=True)
class UbiJudgments:
    queries: Path
    qrels: Path
    info: dict[str, Any]
    #: the behaviour statistics of the same searches (rerank.model.behaviour: PBM-debiased clicks, spam capped)
    behaviour: Path | None = None
    #: ``{normalised query text: searches}`` of the same searches (before spam capping): head and tail queries
    searches: Path | None = None
    #: the same click model's judgments shrunk at :data:`VALIDATION_PRIOR_STRENGTH`: the validation queries' gains
    validation_qrels: Path | None = None
    #: the judgments (training prior) and the behaviour statistics of the log's label part (:data:`LABEL_PART_SHARE`)
    label_part_qrels: Path | None = None
    label_part_behaviour: Path | None = None

    def query_searches(self) -> dict[str, int]:
        return json.loads(self.searches.read_text()) if self.searches is not None else {}


def ubi_query_id(text: str) -> str:
    return "ubi-" + hashlib.sha256(C.normalize_query(text).encode()).hexdigest()[:12]


def write_queries(path: str | Path, queries: Iterable[str], texts: Mapping[str, str]) -> None:
    """The harness's queries TSV of a log's normalised query texts under their ids (:func:`ubi_query_id`), each with its
    text as the log wrote it (``texts``: normalised -> as written; the normalised text where it has none)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("query_id\tquery\tuser_id\n")
        for qn in sorted(queries):
            f.write(f"{ubi_query_id(qn)}\t{texts.get(qn, qn)}\t\n")


def write_qrels(path: str | Path, judgments: Mapping[str, Mapping[str, float]]) -> None:
    """TREC qrels of ``{normalised query text: {product: grade}}`` under the log's query ids (:func:`ubi_query_id`)."""
    with open(path, "w", encoding="utf-8") as f:
        for qn in sorted(judgments):
            for pid, g in sorted(judgments[qn].items()):
                f.write(f"{ubi_query_id(qn)} 0 {pid} {g}\n")


def write_qrels_by_text(uj: UbiJudgments, queries: Iterable[Any], qrels: Mapping[str, Mapping[str, float]], out: str | Path) -> tuple[Path, int]:
    """The graded judgments (``qrels``, keyed by the ids of ``queries``) of the log's query texts, written under the log's
    query ids (:func:`ubi_query_id`) to ``out``: the same training and validation queries as the click judgments, labelled
    by a person instead of by clicks (``fusionrank eval --train-ubi ... --ubi-labels qrels``). Returns the path and how
    many of the log's query texts have no graded query (they keep no label and drop out of training)."""
    from rerank.datasets.data import read_queries

    by_text: dict[str, str] = {}
    for q in queries:
        by_text.setdefault(C.normalize_query(q.text), q.id)
    graded: dict[str, Mapping[str, float]] = {}
    missing = 0
    for q in read_queries(uj.queries).queries:
        qn = C.normalize_query(q.text)
        qid = by_text.get(qn)
        if qid is None or not qrels.get(qid):
            missing += 1
            continue
        graded[qn] = qrels[qid]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    write_qrels(tmp, graded)
    tmp.replace(out)
    return out, missing


#: weight of add-to-carts and purchases per click in the judgments (0: clicks only). 3.0 ranked the shown products
#: closer to the hidden grades (NDCG@10 0.866 -> 0.887) but the fusion ranker trained on them scored 0.013 lower on
#: the held-out dev queries with both click models (docs/benchmarks.md), so it is off by default.
DEFAULT_CONVERSION_WEIGHT = 0.0
#: examinations of prior (at the log's mean click rate) in a judgment's posterior mean (clicks + s m) / (exams + s). On the
#: dev log's 240 training query texts, 5 (the behaviour features' prior) orders the shown products closer to their qrels
#: (NDCG@10 0.9015 against 0.8809 with 1), but the fusion ranker trained on those judgments scored 0.9073 on the held-out
#: queries against 0.9263 with 1 (one training each, docs/benchmarks.md): 1 stays the default
DEFAULT_PRIOR_STRENGTH = 1.0
#: the prior of the judgments that *validate* a model trained from the log (early stopping and the safe-choice verdict of
#: rerank.safe; the retraining loop's held-out estimate). Validation needs labels whose differences between two orders
#: follow the true ones with little noise, more than labels that train well: a pair examined once and clicked once is
#: not a top grade. On the dev log's 240 training query texts the judged products ordered by the judgments agree with
#: their qrels the more the harder they are shrunk (NDCG@10 0.813 at 1, 0.840 at 5, 0.846 at 10, 0.849 at 20, 0.850 at 50):
#: 10 takes most of it. On three click-trained models' validation queries the verdict's paired test then gave p 0.040,
#: 0.027 and 0.12 where prior 1 gave 0.12-0.31 (docs/benchmarks.md); the significance rule itself is unchanged
VALIDATION_PRIOR_STRENGTH = 10.0
#: the share of each query's searches (seeded by search) in the log's *label part* (module doc)
LABEL_PART_SHARE = 0.5


def in_label_part(session: C.Session, index: int, share: float = LABEL_PART_SHARE) -> bool:
    """Whether a search belongs to the log's label part: seeded by its UBI query id (by its place in the log without one),
    the same on every run."""
    key = session.query_id if session.query_id else f"#{index}"
    h = hashlib.blake2b(f"label-part:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < share


@dataclass(frozen=True)
class LogJudgments:
    """A log's implicit judgments for training and, shrunk harder, for validation (the same fitted click model)."""

    train: dict[str, dict[str, float]]
    validation: dict[str, dict[str, float]]
    info: dict[str, Any]
    #: the judgments of the label part alone (training prior), with ``label_part_out``
    label_part: dict[str, dict[str, float]] | None = None


def log_judgments(sessions: list[C.Session], *, model: str = DEFAULT_CLICK_MODEL, cap: int = 3,
                  conversion_weight: float = DEFAULT_CONVERSION_WEIGHT, behaviour_out: Path | None = None,
                  prior_strength: float = DEFAULT_PRIOR_STRENGTH, validation_prior_strength: float = VALIDATION_PRIOR_STRENGTH,
                  label_part_out: Path | None = None) -> LogJudgments:
    """:func:`judgments_from_sessions`, plus the same click model's judgments at ``validation_prior_strength``. With
    ``label_part_out`` (needs ``behaviour_out``): the label part's behaviour statistics are written there and its
    judgments (the click model fitted on the label part's searches alone) returned as ``label_part``."""
    capped, stats = C.cap_sessions(sessions, max_sessions_per_client_query=cap)
    m = C.fit(model, capped)
    conv = C.conversion_counts(capped) if conversion_weight > 0 else None
    info = {"click_model": model, "conversion_weight": conversion_weight, "prior_strength": prior_strength,
            "validation_prior_strength": validation_prior_strength, "spam_capping": stats.to_dict(), "sessions": len(capped),
            "fit": {k: v for k, v in m.info.items() if k != "train_log_likelihood"}}
    if behaviour_out is not None:
        from rerank.model.behaviour import BehaviourStats

        theta = m.theta if m.theta is not None else C.fit_pbm(capped).theta
        b = BehaviourStats.from_sessions(capped, theta, spam_capping=stats.to_dict())
        b.save(behaviour_out)
        info["behaviour"] = {k: v for k, v in b.info.items() if k not in ("theta", "spam_capping")}
    label_part = None
    if label_part_out is not None:
        if behaviour_out is None:
            raise ValueError("label_part_out needs behaviour_out (the label part is taken out of those statistics)")
        part = [s for i, s in enumerate(capped) if in_label_part(s, i)]
        pb = BehaviourStats.from_sessions(part, theta, label_part_share=LABEL_PART_SHARE)
        pb.save(label_part_out)
        pm = C.fit(model, part) if part else m
        pconv = C.conversion_counts(part) if conversion_weight > 0 else None
        label_part = C.implicit_judgments(pm, conversions=pconv, conversion_weight=conversion_weight, prior_strength=prior_strength) if part else {}
        info["label_part"] = {"share": LABEL_PART_SHARE, "sessions": len(part), "queries": len(label_part)}

    def judge(strength: float) -> dict[str, dict[str, float]]:
        return C.implicit_judgments(m, conversions=conv, conversion_weight=conversion_weight, prior_strength=strength)

    train = judge(prior_strength)
    return LogJudgments(train, train if validation_prior_strength == prior_strength else judge(validation_prior_strength), info, label_part)


def judgments_from_sessions(sessions: list[C.Session], *, model: str = DEFAULT_CLICK_MODEL, cap: int = 3,
                            conversion_weight: float = DEFAULT_CONVERSION_WEIGHT, behaviour_out: Path | None = None,
                            prior_strength: float = DEFAULT_PRIOR_STRENGTH) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The click model's judgments of the (spam-capped) ``sessions`` and a summary; with ``behaviour_out``, the
    behaviour statistics of the same capped sessions are written there (PBM's examination probabilities, whatever
    ``model`` judges)."""
    lj = log_judgments(sessions, model=model, cap=cap, conversion_weight=conversion_weight, behaviour_out=behaviour_out,
                       prior_strength=prior_strength, validation_prior_strength=prior_strength)
    info = {k: v for k, v in lj.info.items() if k != "validation_prior_strength"}
    return lj.train, info


def write_ubi_judgments(log_path: str | Path, out_dir: str | Path, *, exclude: Iterable[str] = (), model: str = DEFAULT_CLICK_MODEL,
                        cap: int = 3, conversion_weight: float = DEFAULT_CONVERSION_WEIGHT,
                        prior_strength: float = DEFAULT_PRIOR_STRENGTH,
                        validation_prior_strength: float = VALIDATION_PRIOR_STRENGTH) -> UbiJudgments:
    """Fit ``model`` on the log minus the ``exclude`` query texts; write ``queries.tsv``, ``qrels.tsv`` and
    ``validation-qrels.tsv`` (:func:`log_judgments`) under ``out_dir/<key>/`` (the key hashes the log files, the
    exclusions and the settings: cached)."""
    files = ubi_files(log_path)
    excl = sorted({C.normalize_query(t) for t in exclude})
    h = hashlib.sha256(json.dumps([model, cap, excl, conversion_weight, 6, *([prior_strength] if prior_strength != 1.0 else []),
                                   *([["validation", validation_prior_strength]] if validation_prior_strength != VALIDATION_PRIOR_STRENGTH else [])]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    d = Path(out_dir) / h.hexdigest()[:16]
    qf, rf, inf = d / "queries.tsv", d / "qrels.tsv", d / "info.json"
    bf, sf, vf = d / "behaviour.json.gz", d / "searches.json", d / "validation-qrels.tsv"
    lf, lbf = d / "label-part-qrels.tsv", d / "label-part-behaviour.json.gz"
    if all(f.is_file() for f in (qf, rf, inf, bf, sf, vf, lf, lbf)):
        return UbiJudgments(qf, rf, json.loads(inf.read_text()), bf, sf, vf, lf, lbf)
    queries, events, errors = read_log(log_path)
    sessions, counts = C.sessions_from_log(queries, events)
    ex = set(excl)
    kept = [s for s in sessions if s.query not in ex]
    d.mkdir(parents=True, exist_ok=True)
    lj = log_judgments(kept, model=model, cap=cap, conversion_weight=conversion_weight, behaviour_out=bf,
                       prior_strength=prior_strength, validation_prior_strength=validation_prior_strength, label_part_out=lbf)
    judg, info = lj.train, lj.info
    sf.write_text(json.dumps(C.session_counts(kept), sort_keys=True))
    texts = {}
    for q in queries:
        texts.setdefault(C.normalize_query(q.user_query), q.user_query)
    d.mkdir(parents=True, exist_ok=True)
    write_queries(qf.with_suffix(".tmp"), judg, texts)
    for path, js in ((rf, judg), (vf, lj.validation), (lf, lj.label_part or {})):
        write_qrels(path.with_suffix(".tmp"), js)
    info.update({"log": str(log_path), "bad_lines": len(errors), "excluded_query_texts": len(ex),
                 "sessions_excluded": len(sessions) - len(kept), "queries": len(judg), "judgments": sum(len(v) for v in judg.values()),
                 **counts})
    qf.with_suffix(".tmp").replace(qf)
    rf.with_suffix(".tmp").replace(rf)
    vf.with_suffix(".tmp").replace(vf)
    lf.with_suffix(".tmp").replace(lf)
    inf.write_text(json.dumps(info, indent=1))
    log.info("UBI judgments: %s", info)
    return UbiJudgments(qf, rf, info, bf, sf, vf, lf, lbf)
