"""fusionrank's library: the drop-in rerank call and the model artifact it serves.

    from rerank import Reranker, RankedHits, load_artifact

The names are imported on first use (:pep:`562`), so ``import rerank`` stays light and a submodule such as
:mod:`rerank.datasets.metrics` can be imported without the model's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Reranker", "RankedHits", "RankedHit", "load_artifact", "ModelArtifact"]

_WHERE = {
    "Reranker": "rerank.reranker",
    "RankedHits": "rerank.reranker",
    "RankedHit": "rerank.reranker",
    "load_artifact": "rerank.model.artifact",
    "ModelArtifact": "rerank.model.artifact",
}

if TYPE_CHECKING:  # pragma: no cover
    from rerank.model.artifact import ModelArtifact, load_artifact
    from rerank.reranker import RankedHit, RankedHits, Reranker


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'rerank' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
