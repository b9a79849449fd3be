"""Search-engine adapters, registered by name: ``local`` (embedded) and ``opensearch``.

Engines are imported lazily so that ``indexing`` loads without opensearch-py or tantivy installed.
"""

from __future__ import annotations

from typing import Any

from indexing.engines.base import BulkAction, BulkItemResult, BulkSummary, Filters, Hit, Range, SearchEngine
from indexing.registry import Registry

ENGINES: Registry[SearchEngine] = Registry("engine")


@ENGINES.register("local")
def _local(**kwargs: Any) -> SearchEngine:
    from indexing.engines.local import LocalEngine

    return LocalEngine(**kwargs)


@ENGINES.register("opensearch")
def _opensearch(**kwargs: Any) -> SearchEngine:
    from indexing.engines.opensearch import OpenSearchEngine

    return OpenSearchEngine(**kwargs)


def create_engine(name: str, **kwargs: Any) -> SearchEngine:
    """Create the engine registered as ``name`` (``local`` or ``opensearch``) with engine-specific kwargs."""
    return ENGINES.create(name, **kwargs)


__all__ = ["ENGINES", "create_engine", "BulkAction", "BulkItemResult", "BulkSummary", "Filters", "Hit", "Range", "SearchEngine"]
