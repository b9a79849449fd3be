"""Wiring from settings to parts (engines, encoders, stores). Only the process edge calls this."""

from __future__ import annotations

from typing import TYPE_CHECKING

from indexing.engines import create_engine

if TYPE_CHECKING:
    from indexing.engines.base import SearchEngine
    from workers.settings import Settings


def build_engine(settings: "Settings") -> "SearchEngine":
    """The configured search engine: ``local`` persists under ``data_dir/engine``."""
    if settings.engine == "local":
        return create_engine("local", path=settings.data_dir / "engine")
    return create_engine(settings.engine, **settings.opensearch_kwargs())
