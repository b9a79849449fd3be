"""Fixtures of the encoder tests: the real offline text encoders (loaded once per process, shared by the modules)."""

from __future__ import annotations

import pytest

from indexing.encoders import get_text_encoder


@pytest.fixture(scope="session")
def text_torch():
    return get_text_encoder("minilm", backend="torch", device="cpu")


@pytest.fixture(scope="session")
def text_onnx():
    return get_text_encoder("minilm", backend="onnx-int8", device="cpu")


@pytest.fixture(scope="session")
def text_q8():
    return get_text_encoder("minilm", backend="onnx-q8", device="cpu")
