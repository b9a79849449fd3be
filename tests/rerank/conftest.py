"""Fixtures the rerank tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def text_encoder():
    """The MiniLM text encoder (the real weights, CPU), loaded once for the tests that encode names or queries."""
    from indexing.encoders import get_text_encoder

    return get_text_encoder("minilm", device="cpu")


@pytest.fixture(scope="module")
def intent(request, text_encoder):
    """The intent model of the test module's ``CATALOG_DOCS`` (their attribute values, the names encoded by MiniLM)."""
    from rerank.model.intent import build_intent_model

    return build_intent_model(request.module.CATALOG_DOCS, text_encoder=text_encoder)
