"""torch, imported when first needed, with an error that names the package to install."""

from __future__ import annotations

from typing import Any

from indexing.errors import MissingDependencyError


def require_torch() -> Any:
    """The ``torch`` module; :class:`MissingDependencyError` naming the package when it is not installed."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency of the distribution
        raise MissingDependencyError(f"the fusion ranker needs torch: pip install torch ({e})") from None
    return torch
