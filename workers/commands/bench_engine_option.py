"""``--engine local|opensearch`` of every ``fusionrank bench`` command that touches a search engine.

The option overrides ``FUSIONRANK_ENGINE`` for the command's own process and for what it starts (``bench serve``'s
server processes read the environment), and each benchmark's JSON says which engine it measured (``"engine"``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import typer

HELP = "local | opensearch: the engine to measure (default: FUSIONRANK_ENGINE; opensearch: FUSIONRANK_OPENSEARCH_URL); the JSON says which"


def option() -> Any:
    return typer.Option(None, "--engine", help=HELP)


def use(engine: Optional[str]) -> str:
    """Make ``engine`` (when given) the process's ``FUSIONRANK_ENGINE``; returns the engine in force, checked."""
    from workers.settings import load_settings

    if engine is not None:
        load_settings(engine=engine)  # an unknown name fails here, listing the valid ones
        os.environ["FUSIONRANK_ENGINE"] = engine
    return load_settings().engine
