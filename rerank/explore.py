"""Exploration: some served pages show products the model ranks a little lower, so that the next log judges them.

A model trained from a search log learns only what that log showed. Products the old ranker never showed train as
irrelevant, and a model trained that way ranks them low again, so its own log does not show them either: without
exploration the retraining loop keeps the old ranker's blind spots. Measured in ``docs/benchmarks.md`` (ninth session)
on a simulated second round of the dev log: without exploration coverage barely grew and the retrained model lost
0.004 NDCG@10; exploring every search it gained 0.007 over that, at 0.065 NDCG@10 on each explored page.

On a share of searches (:attr:`ExploreConfig.share`, chosen by a hash of the search's ``query_id``, so that a
request repeated with its id gets the same page), the first ``from_position - 1`` positions keep the model's order
and the positions from ``from_position`` on are filled by drawing, without replacement, from the model's ranks
``from_position`` .. ``depth`` with weight ``1 / rank``: a product at rank 5 is drawn ten times as often as one at
rank 50. Products below ``depth`` follow in the model's order. The served order is what the UBI recorder stores, so
the click model sees every product at the position it was shown (the position-based model corrects for it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from indexing.errors import ConfigError


@dataclass(frozen=True)
class ExploreConfig:
    share: float = 0.0  # share of searches that explore (0: none, the model's order always)
    from_position: int = 4  # the first position (1-based) that may show a drawn product
    depth: int = 50  # the model's ranks (from from_position) a drawn product comes from

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"explore share must be in [0, 1], got {self.share!r}")
        if self.from_position < 1 or self.depth < self.from_position:
            raise ConfigError(f"explore from_position must be at least 1 and depth at least from_position, got "
                              f"{self.from_position!r} and {self.depth!r}")


def _unit(query_id: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{query_id}".encode()).hexdigest()[:12], 16) / float(1 << 48)


def explores(query_id: str, cfg: ExploreConfig) -> bool:
    """Whether the search with this id explores (a seeded function of the id: the same id, the same answer)."""
    return cfg.share > 0.0 and _unit(query_id, "explore") < cfg.share


def explore_order(n: int, query_id: str, cfg: ExploreConfig) -> list[int] | None:
    """The served order of a ranked list of ``n`` products as indices into the model's order, or None when this search
    does not explore (or nothing below ``from_position`` could move)."""
    start = cfg.from_position - 1
    stop = min(cfg.depth, n)
    if not explores(query_id, cfg) or stop - start < 2:
        return None
    rng = np.random.default_rng(int(hashlib.sha256(f"order:{query_id}".encode()).hexdigest()[:16], 16))
    ranks = np.arange(start, stop)
    weights = 1.0 / (ranks + 1.0)
    # drawing without replacement with probabilities proportional to the weights is sorting by -log(u) / weight
    # (exponential clocks: the smallest clock is drawn first)
    clocks = rng.exponential(size=len(ranks)) / weights
    drawn = ranks[np.argsort(clocks, kind="stable")]
    return [*range(start), *drawn.tolist(), *range(stop, n)]


__all__ = ["ExploreConfig", "explore_order", "explores"]
