"""Training the fusion ranker on one or several datasets (catalog + queries + graded qrels + events).

:func:`train_ranker` reuses the evaluation harness's machinery, so a trained model and the baselines
see the same candidates and splits:

1. every dataset's catalog is indexed once into the harness's cache (:func:`~rerank.datasets.pools.cached_index`);
2. its queries are split by query and by user with the harness's seeded splits
   (:func:`~rerank.datasets.splits.load_or_create_splits`, the same file the harness reads); the
   model trains on ``train`` and early-stops on ``validation``; ``test`` is never read;
3. the first stage runs per query (:func:`~rerank.datasets.pools.build_items`; ``rerank`` mode: the
   judged products, as the harness does), with the text-to-image alignment as the retriever's
   ``query_to_image_space`` so the ``knn_image`` list runs for text queries;
4. user histories come from the events file (:func:`rerank.history.profiles.profile_items`, the
   profile rule the serving path uses), with ages measured at the newest event of the file;
5. listwise loss (``softmax``: cross-entropy against the target distribution ``(2^g - 1) / sum``;
   ``lambda``: pairwise logistic weighted by |delta NDCG|), AdamW, early stopping on the mean
   validation NDCG@10 over the datasets, a time budget, a seed;
6. the best epoch's weights, the alignment and a training report go into an artifact
   (:mod:`rerank.model.artifact`).

The text-image alignment is trained first (:mod:`rerank.model.alignment`) on ``TrainConfig.align_catalog``
(default: the first dataset's catalog) unless one is given, and is cached in the data dir.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.errors import CatalogError, ConfigError
from mappings import DEFAULT_MAPPING
from rerank.datasets.metrics import ndcg_at_k
from rerank.model.inputs import CAT_FIELDS, PHOTO_COLOUR, FeatureSpec, HistoryInput, RequestFeatures, build_request_features, colour_input_parts, colour_inputs
from rerank.retrieval.retriever import KNN_IMAGE, LISTS

log = logging.getLogger(__name__)

LOSSES = ("softmax", "lambda")
#: TrainConfig.keep_epoch's choices
EPOCH_CHOICES = ("best", "last", "average")


@dataclass(frozen=True)
class DatasetSpec:
    """One training dataset. ``gain``: the grade -> gain mapping (``identity`` | ``minus1``)."""

    catalog: Path
    queries: Path
    qrels: Path
    gain: str = "identity"
    events: Path | None = None
    images_root: Path | None = None
    name: str | None = None
    mode: str = "rerank"
    #: train only on judged products (implicit judgments from a log: a product never shown is unknown, not irrelevant)
    judged_only: bool = False
    #: the query split's (train, validation, test) fractions; None: the harness's 70/10/20. A set of training queries
    #: only (the harness's ``--train-queries`` / ``--train-ubi``) is split 90/10/0, as the harness splits it for lambdamart
    split: tuple[float, float, float] | None = None
    #: the qrels are implicit judgments from a search log: the validation queries' behaviour inputs are those of queries
    #: the log never saw (a validation query's own clicks are its labels; reading them would be reading the answer)
    labels_from_log: bool = False
    #: the gains of the validation queries (early stopping and the verdict), when they differ from ``qrels``: for a log,
    #: judgments shrunk harder towards the log's mean (rerank.datasets.ubi_judgments.VALIDATION_PRIOR_STRENGTH), which
    #: separate a model from the first stage with less noise than the training labels. None: ``qrels``
    validation_qrels: Path | None = None
    #: the log's label part (rerank.datasets.ubi_judgments.LABEL_PART_SHARE of each query's searches): its judgments and its
    #: behaviour statistics. With ``TrainConfig.behaviour_label_part`` a training query that reads its own behaviour is
    #: labelled by these judgments and reads its columns without these searches (never its labels' own clicks)
    label_part_qrels: Path | None = None
    label_part_behaviour: Path | None = None

    @classmethod
    def from_log(cls, catalog: Path, queries: Path, qrels: Path, *, images_root: Path, name: str, validation_qrels: Path | None,
                 label_part_qrels: Path | None, label_part_behaviour: Path | None, events: Path | None = None) -> "DatasetSpec":
        """A search log's implicit judgments as one dataset, the way ``fusionrank train --from-ubi`` and the retrain task
        train on them: retrieve mode, labels from the log, its query texts split as the harness splits a log's (train and
        validation, no test share)."""
        from rerank.datasets.splits import UBI_VALIDATION_SHARE, ubi_split

        return cls(catalog=Path(catalog), queries=Path(queries), qrels=Path(qrels), gain="identity", events=events,
                   images_root=Path(images_root), name=name, mode="retrieve", labels_from_log=True, validation_qrels=validation_qrels,
                   split=ubi_split(UBI_VALIDATION_SHARE), label_part_qrels=label_part_qrels, label_part_behaviour=label_part_behaviour)

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        """``catalog=C,queries=Q,qrels=R[,events=E][,images_root=D][,gain=G][,mode=M][,name=N]`` (the
        ``fusionrank train --dataset`` form); paths as given, ``images_root`` defaults to the catalog's folder."""
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key or not value.strip():
                raise ConfigError(f"dataset {text!r}: expected comma-separated KEY=VALUE items, got {part!r}")
            if key not in {"catalog", "queries", "qrels", "events", "images_root", "gain", "mode", "name"}:
                raise ConfigError(f"dataset {text!r}: unknown key {key!r}; keys: catalog, queries, qrels, events, images_root, gain, mode, name")
            fields[key] = value.strip()
        missing = [k for k in ("catalog", "queries", "qrels") if k not in fields]
        if missing:
            raise ConfigError(f"dataset {text!r}: missing {', '.join(missing)}")
        catalog = Path(fields["catalog"])
        return cls(
            catalog=catalog, queries=Path(fields["queries"]), qrels=Path(fields["qrels"]), gain=fields.get("gain", "identity"),
            events=Path(fields["events"]) if "events" in fields else None,
            images_root=Path(fields["images_root"]) if "images_root" in fields else catalog.parent,
            name=fields.get("name"), mode=fields.get("mode", "rerank"),
        )

    def check(self) -> None:
        from rerank.datasets.metrics import gain_mapping

        gain_mapping(self.gain)
        if self.mode not in ("rerank", "retrieve"):
            raise ConfigError(f"unknown mode {self.mode!r}; valid modes: rerank, retrieve")
        for label, p in (("catalog", self.catalog), ("queries", self.queries), ("qrels", self.qrels), ("events", self.events),
                         ("validation qrels", self.validation_qrels), ("label part qrels", self.label_part_qrels),
                         ("label part behaviour", self.label_part_behaviour)):
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"dataset {self.name or self.queries}: {label} file not found: {p}")


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = "attention"
    loss: str = "softmax"
    epochs: int = 40
    batch_size: int = 8  # requests per step
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 6
    # early stopping waits for this many epochs: on a small validation split (the fashion benchmark's 30 queries) the
    # curve is noisy, and patience alone once stopped the no-image ablation at epoch 7 on its epoch-1 best (0.855,
    # where a run of the same model had reached 0.917 by epoch 21), which made the ablation comparison a coin toss
    min_epochs: int = 15
    seed: int = 13
    max_minutes: float = 10.0
    max_train_candidates: int = 128  # per training request (a seeded sample, all of it when smaller)
    use_image: bool = True
    use_history: bool = True
    use_product: bool = True
    use_colour: bool = True  # the colour head and the query-colour inputs (rerank.model.colour), when the catalog has colours
    use_intent: bool = True  # the query-intent bound on the model's scores (rerank.model.intent), when the catalog has attribute values
    history_agreement: bool = True  # the history's attribute agreement inputs (rerank.model.ranker.history_agreement), with history
    # the query-to-attribute agreement inputs (rerank.model.attribute_match: catalog values, and photo-completed ones unless
    # use_image is off), read with the intent model's names; needs use_intent
    use_attribute_match: bool = True
    # ... and the photo's predictions below the completion threshold too (the "prediction" source), into the photo columns
    attribute_predictions: bool = False
    d_model: int = 64
    hidden: int = 128
    history_k: int = 20
    top_n: int = 200
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default); 1 avoids oversubscription on a busy machine
    text_model: str = "minilm"
    text_backend: str = "torch"
    image_model: str = "efficientnet_lite0"
    mapping: str = DEFAULT_MAPPING
    attribute_model: str | None = None  # photo attribute model of the indexes (products-v4: photo-completed attributes)
    attribute_threshold: float = 0.8
    align_catalog: Path | None = None  # (title, photo) pairs for the alignment (default: first dataset's catalog)
    align_images_root: Path | None = None
    alignment_dir: Path | None = None  # use this trained alignment instead
    progress: bool = False
    #: behaviour statistics of the training log (rerank.model.behaviour; a ``behaviour.json.gz``): the model reads their
    #: columns and the artifact carries them. None: no behaviour inputs
    behaviour_stats: Path | None = None
    #: share of the training (and validation) query texts shown as queries the log never saw (seeded by text: no query
    #: columns, product columns without the query's own searches), so the model also learns the tail's ranking from
    #: content and from the products' behaviour elsewhere; the verdict and early stopping see both kinds
    behaviour_query_dropout: float = 0.7  # 0.5: 0.0108 lower on held-out dev queries, the same on head queries
    #: the behaviour product columns' scope (rerank.model.behaviour.PRODUCT_SCOPES): "all" counts the product under every
    #: query, the request's own included; "other_queries" leaves the request's own query out (in training and at serving)
    behaviour_product_scope: str = "all"
    #: a training query that reads its own behaviour (1 - behaviour_query_dropout of them) is labelled by the log's label
    #: part and reads its columns from its other searches (DatasetSpec.label_part_qrels / label_part_behaviour, where the
    #: dataset has them: eval --train-ubi, train --from-ubi, the retrain task); False: labels and
    #: columns from the same searches (the columns then hold the labels' own clicks). On the simulated dev log it
    #: validated higher in all four trainings compared (+0.0017 to +0.014 NDCG@10, docs/benchmarks.md)
    behaviour_label_part: bool = True
    #: which weights the training keeps (EPOCH_CHOICES): "best", the best validation epoch with early stopping; "last",
    #: the weights after ``epochs`` epochs; "average", the mean of the weights after each epoch from the second on
    keep_epoch: str = "best"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; valid losses: {', '.join(LOSSES)}")
        from rerank.model.ranker import FUSION_STRATEGIES

        FUSION_STRATEGIES.get(self.strategy)
        from rerank.model.behaviour import check_product_scope

        check_product_scope(self.behaviour_product_scope)
        if not 0.0 <= self.behaviour_query_dropout <= 1.0:
            raise ConfigError(f"behaviour_query_dropout must be in [0, 1], got {self.behaviour_query_dropout}")
        if self.keep_epoch not in EPOCH_CHOICES:
            raise ConfigError(f"keep_epoch must be one of {', '.join(EPOCH_CHOICES)}, got {self.keep_epoch!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.epochs < 1 or self.batch_size < 1 or self.max_train_candidates < 2 or self.max_minutes <= 0 or self.min_epochs < 0:
            raise ConfigError(f"epochs, batch_size >= 1, max_train_candidates >= 2 and max_minutes > 0 needed, got {self}")

    @property
    def ablation(self) -> str:
        if not self.use_image and not self.use_history:
            return "text_only"
        if not self.use_image:
            return "no_image"
        if not self.use_history:
            return "no_history"
        return "full"


@dataclass(frozen=True)
class TrainResult:
    artifact: Path
    report: Mapping[str, Any]


# --------------------------------------------------------------------------- events -> histories
def _parse_ts(v: str) -> float:
    v = v.strip()
    try:
        return float(v)
    except ValueError:
        return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()


def read_events(path: str | Path) -> tuple[dict[str, list[tuple[str, str, float]]], list[tuple[int, str]]]:
    """``{user: [(product_id, event, epoch_s), ...]}`` and the bad lines ``(line, reason)``."""
    from rerank.history.models import EVENT_TYPES

    by_user: dict[str, list[tuple[str, str, float]]] = {}
    bad: list[tuple[int, str]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"user_id", "product_id", "event", "timestamp"}
            if not need <= set(reader.fieldnames or ()):
                raise CatalogError(f"events file {path}: header must name {sorted(need)}, got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                u, p, ev = (row.get("user_id") or "").strip(), (row.get("product_id") or "").strip(), (row.get("event") or "").strip()
                if not u or not p or ev not in EVENT_TYPES:
                    bad.append((line, f"bad user/product/event ({u!r}, {p!r}, {ev!r})"))
                    continue
                try:
                    ts = _parse_ts(row.get("timestamp") or "")
                except ValueError:
                    bad.append((line, f"bad timestamp {row.get('timestamp')!r}"))
                    continue
                by_user.setdefault(u, []).append((p, ev, ts))
    except OSError as e:
        raise CatalogError(f"cannot read events file {path}: {e.strerror or e}") from None
    return by_user, bad


def histories(events: Mapping[str, Sequence[tuple[str, str, float]]], k: int, *, now: float | None = None) -> dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[float, ...]]]:
    """Per user: (product ids, event types, ages in seconds) of the profile rule of rerank.history."""
    from rerank.history.profiles import ProfileConfig, profile_items

    if now is None:
        now = max((ts for evs in events.values() for _, _, ts in evs), default=time.time()) + 1.0
    cfg = ProfileConfig(k=k)
    out = {}
    for u, evs in events.items():
        items = profile_items(evs, cfg, now)
        out[u] = (tuple(i.product_id for i in items), tuple(i.event for i in items), tuple(i.age_s for i in items))
    return out


# --------------------------------------------------------------------------- losses and metrics (torch)
def listwise_softmax_loss(scores, gains, mask):
    """Cross-entropy between ``softmax(scores)`` and ``(2^g - 1) / sum`` per request; requests without a
    positive gain are skipped. ``scores``/``gains``: (B, N); ``mask``: (B, N) bool."""
    import torch

    g = torch.where(mask, torch.pow(2.0, gains) - 1.0, torch.zeros_like(gains))
    tot = g.sum(-1, keepdim=True)
    ok = tot.squeeze(-1) > 0
    if not ok.any():
        return scores.sum() * 0.0
    p = g / tot.clamp(min=1e-12)
    logp = torch.log_softmax(scores.masked_fill(~mask, -1e9), -1)
    return -(p * torch.where(mask, logp, torch.zeros_like(logp))).sum(-1)[ok].mean()


def lambda_loss(scores, gains, mask, k: int = 10):
    """LambdaRank-style: pairwise logistic loss on every (better, worse) pair weighted by |delta NDCG@k|."""
    import torch

    s = scores.masked_fill(~mask, -1e9)
    g = torch.where(mask, torch.pow(2.0, gains) - 1.0, torch.zeros_like(gains))
    with torch.no_grad():
        order = torch.argsort(s, dim=-1, descending=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
        disc = torch.where(ranks < k, 1.0 / torch.log2(ranks.float() + 2.0), torch.zeros_like(s))
        ideal = torch.sort(g, dim=-1, descending=True).values
        idisc = 1.0 / torch.log2(torch.arange(s.shape[-1], device=s.device).float() + 2.0)
        idcg = (ideal[..., :k] * idisc[:k]).sum(-1, keepdim=True).clamp(min=1e-12)
        delta = (g.unsqueeze(-1) - g.unsqueeze(-2)).abs() * (disc.unsqueeze(-1) - disc.unsqueeze(-2)).abs() / idcg.unsqueeze(-1)
        better = (gains.unsqueeze(-1) > gains.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    diff = s.unsqueeze(-1) - s.unsqueeze(-2)
    loss = torch.nn.functional.softplus(-diff) * delta * better
    n = better.sum().clamp(min=1)
    return loss.sum() / n


# --------------------------------------------------------------------------- prepared data
@dataclass(frozen=True, eq=False)
class Example:
    features: RequestFeatures
    gains: np.ndarray  # (N,) in candidate order
    all_gains: Mapping[str, float]  # every judged product's gain (ideal DCG)
    query_id: str
    dataset: str
    tiers: np.ndarray | None = None  # (N,) the intent bound's tiers (rerank.model.intent; None: no bound), for the verdict


@dataclass
class PreparedDataset:
    name: str
    train: list[Example]
    validation: list[Example]
    info: dict[str, Any]


def _sample(n: int, gains: np.ndarray, cap: int, rng: random.Random) -> list[int]:
    if n <= cap:
        return list(range(n))
    pos = [i for i in range(n) if gains[i] > 0]
    neg = [i for i in range(n) if gains[i] <= 0]
    rng.shuffle(pos)
    rng.shuffle(neg)
    # keep both kinds: at least a quarter of the sample for each kind that exists
    n_pos = min(len(pos), max(cap - len(neg), cap // 4 if neg else cap))
    keep = pos[:n_pos] + neg[: cap - n_pos]
    return sorted(keep)


def _fetch_docs(engine: Any, index: str, ids: Sequence[str], *, chunk: int = 1000) -> dict[str, dict[str, Any]]:
    from rerank.model.intent import photo_fields

    # image_colour: read by the colour head where the index has it; the photo-completed attributes (products-v4) by the
    # attribute agreement inputs and the intent bound
    want = [F.TEXT_VEC, F.IMAGE_VEC, F.IMAGE_COLOUR, *CAT_FIELDS, *photo_fields()]
    out: dict[str, dict[str, Any]] = {}
    ids = sorted(set(ids))
    for s in range(0, len(ids), chunk):
        out.update(engine.get(index, ids[s : s + chunk], fields=want))
    return out


def _dataset_index(spec: DatasetSpec, config: TrainConfig, *, data_dir: Path, indexer: Callable[[Any, Any], Any]) -> Any:
    """The dataset's catalog indexed with the configured encoders (the harness's cached index)."""
    from rerank.datasets.pools import cached_index

    return cached_index(
        Path(spec.catalog), Path(spec.images_root) if spec.images_root else None, data_dir=data_dir, indexer=indexer,
        text_model=config.text_model, text_backend=config.text_backend, image_model=config.image_model, device=config.device, mapping=config.mapping,
        attribute_model=config.attribute_model, attribute_threshold=config.attribute_threshold,
    )


def _photo_indexes(datasets: Sequence[DatasetSpec], config: TrainConfig, *, data_dir: Path, indexer: Callable[[Any, Any], Any]) -> Iterator[Any]:
    """The cached index of each dataset that has photos (an images root)."""
    for ds in datasets:
        if ds.images_root is not None:
            yield _dataset_index(ds, config, data_dir=data_dir, indexer=indexer)


def prepare_dataset(
    spec: DatasetSpec,
    *,
    data_dir: Path,
    indexer: Callable[[Any, Any], Any],
    text_encoder: Any,
    alignment: Any | None,
    feature_spec: FeatureSpec,
    config: TrainConfig,
    parts: Sequence[str] = ("train", "validation"),
    colour: Any | None = None,
    intent: Any | None = None,
    behaviour: Any | None = None,
) -> PreparedDataset:
    """Index (cached), split, first stage, features of one dataset's queries of ``parts``.

    ``train`` requests are a seeded sample of at most ``max_train_candidates`` candidates; the other
    parts keep every candidate (an evaluation script may ask for ``("test",)``: the result's
    ``validation`` then holds the test queries). ``behaviour`` (:class:`rerank.model.behaviour.BehaviourStats`, when
    ``feature_spec.behaviour``) gives the behaviour columns; a seeded ``config.behaviour_query_dropout`` share of the
    query texts is shown as the log never saw them (:meth:`~rerank.model.behaviour.BehaviourStats.features` with
    ``query_level=False``)."""
    from rerank.datasets.data import read_qrels, read_queries
    from rerank.datasets.metrics import has_positive_gain, map_gains
    from rerank.datasets.pools import build_items, dataset_name, eval_queries, judged_share
    from rerank.datasets.splits import load_or_create_splits
    from rerank.retrieval.retriever import RetrievalConfig, Retriever

    spec.check()
    name = spec.name or dataset_name(spec.queries)
    idx = _dataset_index(spec, config, data_dir=data_dir, indexer=indexer)
    qs = read_queries(spec.queries)
    qrels = read_qrels(spec.qrels)
    held_qrels = read_qrels(spec.validation_qrels) if spec.validation_qrels is not None else qrels
    label_part = None  # (judgments, statistics) of the log's label part, for the training queries that read their own behaviour
    if config.behaviour_label_part and feature_spec.behaviour and behaviour is not None and spec.label_part_qrels is not None \
            and spec.label_part_behaviour is not None:
        from rerank.model.behaviour import BehaviourStats

        label_part = (read_qrels(spec.label_part_qrels), BehaviourStats.load(spec.label_part_behaviour))
    splits = load_or_create_splits(qs.queries, data_dir, name=name, seed=config.seed, **({"fractions": spec.split} if spec.split else {}))
    q2i = alignment.query_to_image_space if (alignment is not None and KNN_IMAGE in feature_spec.lists) else None
    retriever = Retriever(idx.engine, idx.alias, text_encoder=text_encoder, query_to_image_space=q2i, config=RetrievalConfig(top_n=config.top_n, per_list=config.top_n))
    by_part: dict[str, list[Any]] = {}
    for part in parts:
        part_qrels = qrels if part == "train" else held_qrels
        keep, _ = eval_queries([q for q in qs.queries if q.id in splits.get(part)], part_qrels, spec.gain)
        items, failed = build_items(retriever, keep, part_qrels, gain=spec.gain, mode=spec.mode, top_n=config.top_n, progress=config.progress, desc=f"first stage ({name}, {part})")
        if failed:
            log.warning("%s: %d %s queries failed in the first stage (kept with empty lists)", name, len(failed), part)
        by_part[part] = items
    hist: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[float, ...]]] = {}
    bad_events: list[tuple[int, str]] = []
    if spec.events is not None:
        evs, bad_events = read_events(spec.events)
        hist = histories(evs, feature_spec.history_k)
    need = {c.id for items in by_part.values() for it in items for c in it.pool_candidates.candidates}
    users = {it.user_id for items in by_part.values() for it in items if it.user_id}
    for u in users:
        need.update(hist.get(u, ((), (), ()))[0])
    docs = _fetch_docs(idx.engine, idx.alias, sorted(need))
    # project every photo once (frozen alignment); features then carry aligned vectors (identity projection),
    # and the colour head's reading of the raw photo (it needs the raw vector, which the projection replaces)
    if alignment is not None:
        with_img = [i for i, d in docs.items() if d.get(F.IMAGE_VEC) is not None]
        for s in range(0, len(with_img), 2048):
            chunk = with_img[s : s + 2048]
            raw = np.asarray([docs[i][F.IMAGE_VEC] for i in chunk], dtype=np.float32)
            proj = alignment.project(raw)
            probs: Sequence[Any] = [None] * len(chunk)
            if colour is not None:
                rows, ok = colour_inputs([docs[i] for i in chunk], raw, colour)
                probs = [p if o else None for p, o in zip(colour.photo_probs(rows), ok)]
            for i, v, p in zip(chunk, proj, probs):
                docs[i] = {**docs[i], F.IMAGE_VEC: v, PHOTO_COLOUR: p}
    else:
        docs = {i: {k: v for k, v in d.items() if k != F.IMAGE_VEC} for i, d in docs.items()}
    identity = (lambda x: x) if alignment is not None else None
    qvecs = {}
    all_items = [it for items in by_part.values() for it in items]
    if all_items:
        enc = retriever.encode_queries([it.query for it in all_items])
        qvecs = {it.query_id: enc[i] for i, it in enumerate(all_items)}
    rng = random.Random(f"{config.seed}:{name}")
    out: dict[str, list[Example]] = {p: [] for p in parts}
    with_history = 0
    own_labelled = 0
    dt = int(text_encoder.dim)
    for part, items in by_part.items():
        for it in items:
            cands = list(it.pool_candidates.candidates)
            item_gains = it.gains
            keep_q = False
            if feature_spec.behaviour and behaviour is not None:
                # a validation query judged by its own clicks never reads them: shown as a query the log never saw
                keep_q = behaviour.keeps_query(it.query, config.behaviour_query_dropout, config.seed) and not (part != "train" and spec.labels_from_log)
            without = None
            if keep_q and part == "train" and label_part is not None:
                lg = map_gains(label_part[0].for_query(it.query_id), spec.gain)
                if has_positive_gain(lg):  # labelled by the label part, its columns from the other searches
                    item_gains, without = lg, label_part[1]
                    own_labelled += 1
                else:  # the label part judged nothing of it: shown as a query the log never saw
                    keep_q = False
            gains = np.array([float(item_gains.get(c.id, 0.0)) for c in cands], dtype=np.float32)
            if part == "train" and spec.judged_only:
                judged = [i for i, c in enumerate(cands) if c.id in item_gains]
                cands, gains = [cands[i] for i in judged], gains[judged]
            if part == "train":
                keep = _sample(len(cands), gains, config.max_train_candidates, rng)
                cands, gains = [cands[i] for i in keep], gains[keep]
            h = None
            if it.user_id and it.user_id in hist:
                pids, evs, ages = hist[it.user_id]
                h = HistoryInput(pids, tuple((docs.get(p) or {}).get(F.TEXT_VEC) for p in pids), tuple((docs.get(p) or {}).get(F.IMAGE_VEC) for p in pids), evs, ages,
                                 tuple(docs.get(p) for p in pids))
                with_history += 1
            beh = None
            if feature_spec.behaviour and behaviour is not None:  # validation too (qrels labels: the verdict and early stopping see both kinds)
                beh = behaviour.features(it.query, [c.id for c in cands], query_level=keep_q, product_scope=feature_spec.behaviour_product_scope,
                                         without=without)
            feats = build_request_features(qvecs[it.query_id], cands, docs, feature_spec, history=h, project=identity, text_dim=dt, image_dim=dt,
                                           colour=colour, intent=intent if feature_spec.attributes else None, behaviour=beh)
            tiers = intent.assess(qvecs[it.query_id], [docs.get(c.id) for c in cands]).tiers if intent is not None and part != "train" else None
            out[part].append(Example(feats, gains, dict(item_gains), it.query_id, name, tiers))
    held = [p for p in parts if p != "train"]
    info = {
        "catalog": str(spec.catalog),
        "queries": str(spec.queries),
        "qrels": str(spec.qrels),
        "events": str(spec.events) if spec.events else None,
        "gain": spec.gain,
        "mode": spec.mode,
        "index": str(idx.path),
        "splits_file": splits.path,
        **{f"{p}_queries": len(v) for p, v in out.items()},
        "requests_with_history": with_history,
        "bad_event_lines": len(bad_events),
        "knn_image_list": "runs (alignment)" if q2i is not None else "skipped",
        "colour_inputs": feature_spec.colour,
        "attribute_inputs": list(feature_spec.attributes),
        "behaviour_inputs": feature_spec.behaviour and behaviour is not None,
        **({"labels_from_log": True, "log_coverage": {p: judged_share(v) for p, v in by_part.items()}} if spec.labels_from_log else {}),
        **({"validation_qrels": str(spec.validation_qrels)} if spec.validation_qrels is not None else {}),
        **({"label_part": {"qrels": str(spec.label_part_qrels), "train_queries_labelled_by_it": own_labelled}} if label_part is not None else {}),
    }
    log.info("%s: %s", name, info)
    return PreparedDataset(name, out.get("train", []), [e for p in held for e in out[p]], info)


# --------------------------------------------------------------------------- the loop
def validation_ndcg(model: Any, examples: Sequence[Example], *, batch_size: int = 16) -> float:
    """Mean NDCG@10 of the model's order (ties by id) over the examples (ideal DCG from every judged gain)."""
    if not examples:
        return 0.0
    vals = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        scored = model.score_requests([e.features for e in chunk])
        for e, r in zip(chunk, scored):
            order = [d for _, d in sorted(zip((-r.scores).tolist(), r.ids))]
            vals.append(ndcg_at_k(order, e.all_gains, 10))
    return float(np.mean(vals))


def fit(
    train: Sequence[Example],
    valid_sets: Mapping[str, Sequence[Example]],
    ranker_config: Any,
    config: TrainConfig,
) -> tuple[Any, dict[str, Any]]:
    """Train a :class:`~rerank.model.ranker.FusionRanker`; returns the best-validation model and the history."""
    import torch
    from tqdm import tqdm

    from rerank.model.ranker import build_ranker
    from rerank.model.inputs import collate, to_torch

    if not train:
        raise ConfigError("no training queries (every query of the train split lacks a positive gain, or the split is empty)")
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model = build_ranker(ranker_config, device=config.device, seed=config.seed)
    dev = model.device
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = listwise_softmax_loss if config.loss == "softmax" else lambda_loss
    rng = random.Random(config.seed)
    t0 = time.perf_counter()

    def val() -> tuple[float, dict[str, float]]:
        per = {n: validation_ndcg(model, ex) for n, ex in valid_sets.items() if ex}
        return (float(np.mean(list(per.values()))) if per else 0.0), per

    base, base_per = val()
    best, best_state, best_epoch, bad = base, {k: v.detach().clone() for k, v in model.state_dict().items()}, 0, 0
    history: list[dict[str, Any]] = [{"epoch": 0, "validation_ndcg@10": round(base, 6), "per_dataset": {k: round(v, 6) for k, v in base_per.items()}}]
    stopped = "epochs"
    avg_state: dict[str, Any] | None = None
    n_avg = 0
    bar = tqdm(range(1, config.epochs + 1), desc="training", unit="epoch", disable=not config.progress, file=sys.stderr)
    for epoch in bar:
        model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        total, steps = 0.0, 0
        for s in range(0, len(order), config.batch_size):
            batch = [train[i] for i in order[s : s + config.batch_size]]
            x = to_torch(collate([e.features for e in batch]), dev)
            n = x["cand_mask"].shape[1]
            g = np.zeros((len(batch), n), dtype=np.float32)
            for i, e in enumerate(batch):
                g[i, : len(e.gains)] = e.gains
            out = model(x)
            loss = loss_fn(out.scores, torch.from_numpy(g).to(dev), x["cand_mask"])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += loss.item()
            steps += 1
        v, per = val()
        history.append({"epoch": epoch, "train_loss": round(total / max(steps, 1), 6), "validation_ndcg@10": round(v, 6), "per_dataset": {k: round(x, 6) for k, x in per.items()}})
        bar.set_postfix(loss=f"{total / max(steps, 1):.4f}", val_ndcg=f"{v:.4f}")
        log.info("epoch %d: train loss %.4f, validation NDCG@10 %.4f", epoch, total / max(steps, 1), v)
        if config.keep_epoch != "best":  # no early stopping: every epoch runs
            if config.keep_epoch == "average" and epoch >= 2:
                state = model.state_dict()
                if avg_state is None:
                    avg_state, n_avg = {k: t.detach().clone().float() for k, t in state.items()}, 1
                else:
                    n_avg += 1
                    for k, t in state.items():
                        avg_state[k] += (t.detach().float() - avg_state[k]) / n_avg
            best, best_epoch = v, epoch  # the weights kept ("last"; "average" is validated once it is made)
        elif v > best + 1e-5:
            best, best_epoch, bad = v, epoch, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            bad += 1
            if bad >= config.patience and epoch >= config.min_epochs:
                stopped = f"early stopping: no validation gain for {config.patience} epochs"
                break
        if time.perf_counter() - t0 > config.max_minutes * 60:
            stopped = f"time budget of {config.max_minutes} min reached"
            break
    bar.close()
    if config.keep_epoch == "best":
        model.load_state_dict(best_state)
    elif avg_state is not None:  # "average"
        model.load_state_dict({k: t.to(best_state[k].dtype) for k, t in avg_state.items()})
        best, _ = val()
    model.eval()
    return model, {
        "epochs_run": history[-1]["epoch"],
        "best_epoch": best_epoch,
        "best_validation_ndcg@10": round(best, 6),
        "untrained_validation_ndcg@10": round(base, 6),
        "stopped": stopped,
        "seconds": round(time.perf_counter() - t0, 1),
        "history": history,
    }


def _alignment_for(config: TrainConfig, datasets: Sequence[DatasetSpec], *, data_dir: Path, text_encoder: Any, indexer: Callable[[Any, Any], Any]) -> Any | None:
    from rerank.model.alignment import Alignment, AlignmentConfig, align_catalog, read_pairs, vectors_from_index

    if config.alignment_dir is not None:
        return Alignment.load(config.alignment_dir)
    catalog = config.align_catalog or datasets[0].catalog
    root = config.align_images_root if config.align_catalog else (datasets[0].images_root or Path(datasets[0].catalog).parent)
    if config.align_catalog and root is None:
        root = Path(config.align_catalog).parent
    try:
        pairs = read_pairs(catalog, root)
    except CatalogError as e:
        log.warning("no alignment: %s", e)
        return None
    if len(pairs) < 50:
        log.warning("no alignment: only %d (title, photo) pairs in %s", len(pairs), catalog)
        return None
    from indexing.encoders import get_image_encoder, image_encoder_info

    acfg = AlignmentConfig(seed=config.seed)
    info = image_encoder_info(config.image_model)
    from rerank.datasets.data import file_sha256

    key = hashlib.sha256(json.dumps([file_sha256(catalog), str(root), text_encoder.model_id, info.model_id, asdict(acfg)], default=str).encode()).hexdigest()[:16]
    cached = Path(data_dir) / "alignments" / key
    if (cached / "alignment.json").is_file():
        log.info("using the cached alignment %s", cached)
        return Alignment.load(cached)
    # photos already encoded in a dataset's index are read, not re-encoded
    known: dict[str, np.ndarray] = {}
    for idx in _photo_indexes(datasets, config, data_dir=data_dir, indexer=indexer):
        known.update(vectors_from_index(idx.engine, idx.alias, [p.product_id for p in pairs if p.product_id not in known]))
    image_encoder = get_image_encoder(config.image_model, device=config.device) if len(known) < len(pairs) else _InfoOnly(info)
    al = align_catalog(catalog, root, text_encoder=text_encoder, image_encoder=image_encoder, cache_dir=data_dir, config=acfg, known_image_vectors=known, progress=config.progress)
    al.save(cached)
    return al


def _colour_for(config: TrainConfig, datasets: Sequence[DatasetSpec], *, data_dir: Path, text_encoder: Any, indexer: Callable[[Any, Any], Any]) -> Any | None:
    """The colour head (:mod:`rerank.model.colour`) trained on the photographed products of the datasets' indexes
    whose colour field is filled; None (logged) when they have fewer than two such colours (e.g. Home Depot)."""
    from rerank.model.colour import ColourConfig, train_colour_model

    ids: list[str] = []
    vecs: list[Any] = []
    descs: list[Any] = []
    colours: list[Any] = []
    for idx in _photo_indexes(datasets, config, data_dir=data_dir, indexer=indexer):
        for d in idx.engine.iter_documents(idx.alias):
            if d.get(F.IMAGE_VEC) is not None and d.get(F.COLOUR):
                ids.append(str(d.get(F.ID)))
                vecs.append(d[F.IMAGE_VEC])
                descs.append(d.get(F.IMAGE_COLOUR))
                colours.append(d[F.COLOUR])
    try:
        if not ids:
            raise ConfigError("no photographed product has a colour field")
        raw = np.asarray(vecs, dtype=np.float32)
        inputs = [(F.IMAGE_VEC, raw.shape[1])]
        if all(v is not None for v in descs):  # every photo has its pixel colour descriptor (products-v3 indexes): read it too
            from indexing.photo_colour import DIM

            inputs.insert(0, (F.IMAGE_COLOUR, DIM))
        else:
            log.info("colour head on %s alone: %d of %d photos have no %s (an index from a mapping before products-v3)",
                     F.IMAGE_VEC, sum(v is None for v in descs), len(descs), F.IMAGE_COLOUR)
        # the rows as serving builds them (rerank.model.inputs.colour_inputs), from the same inputs in the same order
        parts, _ = colour_input_parts([{F.IMAGE_COLOUR: v} for v in descs], raw, inputs)
        return train_colour_model(np.hstack(parts), colours, ids, text_encoder=text_encoder, config=ColourConfig(seed=config.seed), inputs=inputs)
    except ConfigError as e:
        log.info("no colour head: %s", e)
        return None


def _intent_for(config: TrainConfig, datasets: Sequence[DatasetSpec], *, data_dir: Path, text_encoder: Any, indexer: Callable[[Any, Any], Any]) -> Any | None:
    """The intent bound (:mod:`rerank.model.intent`) of the datasets' indexes: their documents' attribute values encoded by the
    text encoder; None (logged) when no document has one (a catalog of titles only)."""
    from rerank.model.intent import INTENT_ATTRIBUTES, build_intent_model

    def docs() -> Iterator[Mapping[str, Any]]:
        for ds in datasets:
            idx = _dataset_index(ds, config, data_dir=data_dir, indexer=indexer)
            for d in idx.engine.iter_documents(idx.alias):
                yield {a: d.get(a) for a in INTENT_ATTRIBUTES}

    return build_intent_model(docs(), text_encoder=text_encoder)


class _InfoOnly:
    """An image 'encoder' standing for the real one when every photo's features are known already."""

    def __init__(self, info: Any):
        self.model_id, self.dim = info.model_id, info.dim

    def encode(self, images: Any, **_: Any) -> np.ndarray:  # pragma: no cover - only reached if a feature is missing
        raise ConfigError("image features were expected to be known already")


def train_ranker(
    datasets: Sequence[DatasetSpec],
    *,
    out: str | Path,
    data_dir: str | Path,
    indexer: Callable[[Any, Any], Any],
    config: TrainConfig = TrainConfig(),
    alignment: Any | None = None,
) -> TrainResult:
    """Train one fusion ranker on every dataset's train split; write the artifact to ``out``."""
    from indexing.encoders import get_text_encoder, image_encoder_info, text_encoder_info
    from rerank.model.artifact import EncoderRef, save_artifact
    from rerank.model.ranker import RankerConfig

    if not datasets:
        raise ConfigError("train_ranker needs at least one dataset")
    for ds in datasets:
        ds.check()
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    text_encoder = get_text_encoder(config.text_model, backend=config.text_backend, device=config.device)
    if config.use_image and alignment is None:
        alignment = _alignment_for(config, datasets, data_dir=data_dir, text_encoder=text_encoder, indexer=indexer)
    if not config.use_image:
        alignment = None
    # the no-image ablation keeps the colour head for its text inputs (query colours, the colour field); it never sees a photo
    colour = _colour_for(config, datasets, data_dir=data_dir, text_encoder=text_encoder, indexer=indexer) if config.use_colour else None
    intent = _intent_for(config, datasets, data_dir=data_dir, text_encoder=text_encoder, indexer=indexer) if config.use_intent else None
    lists = LISTS if config.use_image else tuple(l for l in LISTS if l != KNN_IMAGE)
    from rerank.model.attribute_match import PHOTO, PREDICTION
    from rerank.model.intent import CATALOG

    behaviour = None
    if config.behaviour_stats is not None:
        from rerank.model.behaviour import BehaviourStats

        behaviour = BehaviourStats.load(config.behaviour_stats)
    # the photo's completed values only where the model sees photos (the no-image ablation reads the catalog's alone)
    photo = (PHOTO, PREDICTION) if config.attribute_predictions else (PHOTO,)
    attributes = ((CATALOG, *photo) if config.use_image else (CATALOG,)) if intent is not None and config.use_attribute_match else ()
    fspec = FeatureSpec(lists=lists, history_k=config.history_k, colour=colour is not None, attributes=attributes,
                        behaviour=behaviour is not None, behaviour_product_scope=config.behaviour_product_scope if behaviour is not None else "all")
    prepared = [prepare_dataset(ds, data_dir=data_dir, indexer=indexer, text_encoder=text_encoder, alignment=alignment, feature_spec=fspec, config=config,
                                colour=colour, intent=intent, behaviour=behaviour) for ds in datasets]
    train = [e for p in prepared for e in p.train]
    valid = {p.name: p.validation for p in prepared}
    rcfg = RankerConfig(
        text_dim=int(text_encoder.dim),
        first_stage_dim=fspec.first_stage_dim,
        n_cat_fields=len(fspec.cat_fields),
        hash_buckets=fspec.hash_buckets,
        history_k=fspec.history_k,
        d_model=config.d_model,
        hidden=config.hidden,
        strategy=config.strategy,
        use_image=config.use_image and alignment is not None,
        use_history=config.use_history,
        use_product=config.use_product,
        history_agreement=config.history_agreement and config.use_history,
    )
    model, fit_report = fit(train, valid, rcfg, config)
    serving = verdict(model, [e for p in prepared for e in p.validation], fspec, seed=config.seed)
    log.info("verdict: %s", serving["verdict"]["summary"])
    img_info = image_encoder_info(config.image_model)
    report = {
        "ablation": config.ablation,
        "train_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "datasets": {p.name: p.info for p in prepared},
        "alignment": alignment.report if alignment is not None else None,
        "colour": colour.report if colour is not None else None,
        "intent": intent.report if intent is not None else None,
        "behaviour": behaviour.info if behaviour is not None else None,
        **fit_report,
        "serving": serving,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    path = save_artifact(
        out,
        model,
        feature_spec=fspec,
        text_encoder=EncoderRef.of(text_encoder_info(config.text_model, backend=config.text_backend)),
        image_encoder=EncoderRef.of(img_info),
        alignment=alignment,
        colour=colour,
        intent=intent,
        report=report,
        extra={"ablation": config.ablation, "serving": serving},
        behaviour=behaviour,
    )
    return TrainResult(path, report)


def verdict(model: Any, examples: Sequence[Example], spec: FeatureSpec, *, seed: int, batch_size: int = 16) -> dict[str, Any]:
    """The trained model against every first-stage signal on the validation ``examples`` (every dataset's, pooled):
    :func:`rerank.safe.decide_serving`, the artifact's ``serving`` block. The model's scores are judged as served: with
    the intent bound (:func:`rerank.model.intent.bound_scores`) where the examples carry its tiers."""
    from rerank.model.intent import bound_scores
    from rerank.safe import decide_serving

    rows = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        for e, r in zip(chunk, model.score_requests([e.features for e in chunk])):
            scores = np.asarray(r.scores, dtype=np.float64)
            rows.append((tuple(r.ids), bound_scores(scores, e.tiers) if e.tiers is not None else scores, e.all_gains, e.features))
    return decide_serving(rows, spec.lists, seed=seed)


__all__ = [
    "DatasetSpec",
    "Example",
    "LOSSES",
    "PreparedDataset",
    "TrainConfig",
    "TrainResult",
    "fit",
    "histories",
    "lambda_loss",
    "listwise_softmax_loss",
    "prepare_dataset",
    "read_events",
    "train_ranker",
    "validation_ndcg",
    "verdict",
]
