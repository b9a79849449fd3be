"""Seeded train / validation / test splits by query, and by user for personalized query sets.

Never by row: every judgment of a query lands in the query's split. Grouping:

* a query with a ``user_id`` belongs to the group ``user:<id>`` (all queries of a shopper go together,
  so a model never sees a test shopper's history-and-query pair in training);
* a query without a user belongs to the group ``text:<normalized query text>`` (two ids with the same
  wording cannot straddle the split).

Groups are ordered by ``sha256(f"{seed}:{group}")`` and cut at the cumulative query counts that match
the fractions (so the proportions hold to within one group). The result is written once to
``<data_dir>/eval-splits/<name>-<key>.json`` (the key hashes the query ids, users, texts, seed and
fractions); later runs read that file, so every system and every run sees the same test queries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from indexing.errors import ConfigError
from rerank.datasets.data import Query

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_SEED = 13

#: the validation share of the query texts of a log (``--train-ubi``; ``--ubi-validation-share``; ``fusionrank train
#: --from-ubi``; the retrain task): the click-judged validation queries decide early stopping and the safe-choice verdict (rerank.safe), whose
#: paired test needs more queries when their labels are clicks than when they are qrels. On the simulated dev log, three
#: trainings each (seeds 13-15): 0.1 (24 queries) gave the `fusion` model the safe choice (p 0.38); 0.2 (48) served it in
#: two of three (p 0.020, 0.006; 0.095); 0.3 (72) in all three (p 0.002, 0.012, 0.002), 168 training queries against 216
#: costing no visible quality (docs/benchmarks.md)
UBI_VALIDATION_SHARE = 0.3


def ubi_split(validation_share: float) -> tuple[float, float, float]:
    """The train / validation / test fractions of a log's query texts: no test share (the evaluated queries are apart)."""
    return (round(1.0 - validation_share, 10), float(validation_share), 0.0)


_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Splits:
    train: frozenset[str]
    validation: frozenset[str]
    test: frozenset[str]
    seed: int
    fractions: tuple[float, float, float]
    path: str | None = None

    def get(self, name: str) -> frozenset[str]:
        if name == "all":
            return self.train | self.validation | self.test
        if name not in SPLIT_NAMES:
            raise ConfigError(f"unknown split {name!r}; valid splits: {', '.join(SPLIT_NAMES + ('all',))}")
        return getattr(self, name)

    def of(self, query_id: str) -> str:
        for name in SPLIT_NAMES:
            if query_id in getattr(self, name):
                return name
        raise KeyError(query_id)


def group_of(q: Query) -> str:
    if q.user_id:
        return f"user:{q.user_id}"
    return "text:" + _SPACES.sub(" ", q.text.strip().lower())


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ConfigError(f"split fractions must be three non-negative numbers (train, validation, test) summing to 1, got {tuple(fractions)}")
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def assign(queries: Sequence[Query], *, seed: int = DEFAULT_SEED, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """``{query_id: split name}``; pure and deterministic in (queries, seed, fractions)."""
    fr = _check_fractions(fractions)
    groups: dict[str, list[str]] = {}
    for q in queries:
        groups.setdefault(group_of(q), []).append(q.id)
    order = sorted(groups, key=lambda g: (hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(), g))
    total = sum(len(v) for v in groups.values())
    cut_train = fr[0] * total
    cut_val = (fr[0] + fr[1]) * total
    out: dict[str, str] = {}
    done = 0
    for g in order:
        # a group goes where its first query would fall in the cumulative order
        name = "train" if done < cut_train else "validation" if done < cut_val else "test"
        for qid in groups[g]:
            out[qid] = name
        done += len(groups[g])
    return out


def splits_key(queries: Sequence[Query], seed: int, fractions: Sequence[float]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([seed, list(fractions)]).encode())
    for q in sorted(queries, key=lambda q: q.id):
        h.update(f"{q.id}\t{q.user_id or ''}\t{q.text}\n".encode())
    return h.hexdigest()[:16]


def load_or_create_splits(
    queries: Sequence[Query],
    data_dir: str | Path | None,
    *,
    name: str = "queries",
    seed: int = DEFAULT_SEED,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Splits:
    """The splits of ``queries``: read from the data dir when written before, else computed and written."""
    fr = _check_fractions(fractions)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "queries"
    path: Path | None = None
    mapping: dict[str, str] | None = None
    if data_dir is not None:
        path = Path(data_dir) / "eval-splits" / f"{safe}-{splits_key(queries, seed, fr)}.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                mapping = {qid: s for s, ids in stored["splits"].items() for qid in ids}
            except (OSError, ValueError, KeyError, AttributeError) as e:
                log.warning("ignoring unreadable splits file %s (%s); recomputing", path, e)
                mapping = None
            if mapping is not None and set(mapping) != {q.id for q in queries}:
                log.warning("splits file %s does not cover these queries; recomputing", path)
                mapping = None
    if mapping is None:
        mapping = assign(queries, seed=seed, fractions=fr)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            body = {
                "seed": seed,
                "fractions": dict(zip(SPLIT_NAMES, fr)),
                "grouping": "by user for queries with a user_id, else by normalized query text",
                "splits": {s: sorted(q for q, v in mapping.items() if v == s) for s in SPLIT_NAMES},
            }
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(body, indent=1))
            os.replace(tmp, path)
            log.info("wrote splits to %s", path)
    by = {s: frozenset(q for q, v in mapping.items() if v == s) for s in SPLIT_NAMES}
    return Splits(by["train"], by["validation"], by["test"], seed, fr, str(path) if path else None)
