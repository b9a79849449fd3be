"""``from rerank import Reranker``: the library's front door, and it stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rerank


def test_the_front_door_names_the_drop_in_call_and_the_artifact_loader() -> None:
    from rerank.model.artifact import ModelArtifact, load_artifact
    from rerank.reranker import RankedHit, RankedHits, Reranker

    assert (rerank.Reranker, rerank.RankedHits, rerank.RankedHit) == (Reranker, RankedHits, RankedHit)
    assert (rerank.load_artifact, rerank.ModelArtifact) == (load_artifact, ModelArtifact)
    assert set(rerank.__all__) <= set(dir(rerank))


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="'Rerankr'"):
        rerank.Rerankr  # noqa: B018


def test_importing_the_package_loads_neither_torch_nor_the_model() -> None:
    code = "import sys, rerank; print(sorted(m for m in ('torch', 'rerank.reranker', 'rerank.model.ranker') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
