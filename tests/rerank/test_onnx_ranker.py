"""The fusion ranker on onnxruntime: the same scores, gates and history weights as torch; fallbacks and refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from indexing.errors import ConfigError
from rerank.model import onnx_ranker
from rerank.model.ranker import STRATEGIES
from rerank.model.onnx_ranker import OnnxExportError, OnnxRanker, cpu_runtime, runtime_name
from tests.rerank.test_model import _model, _request

ATOL = 1e-5


def _requests():
    """One request with history and photos on every other candidate, one without history, one without any photo
    (each a different length, so the batch of all three is padded)."""
    return [_request(12, seed=1), _request(7, seed=2, history=False), _request(5, seed=3, photo_every=99)]


def _same(got, want):
    assert got.ids == want.ids and got.hist_ids == want.hist_ids
    np.testing.assert_allclose(got.scores, want.scores, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.gates, want.gates, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.history_weights, want.history_weights, atol=ATOL, rtol=0)
    assert list(np.argsort(-got.scores, kind="stable")) == list(np.argsort(-want.scores, kind="stable"))
    for g, w in zip(got.explain_all(), want.explain_all()):  # the explanation: the same history items, gates to rounding
        assert [h["product_id"] for h in g["history_top"]] == [h["product_id"] for h in w["history_top"]]
        assert g["gates"] == pytest.approx(w["gates"], abs=ATOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_onnx_scores_equal_torch_one_request_at_a_time_and_batched(strategy):
    m = _model(strategy)
    fast = OnnxRanker(m)
    reqs = _requests()
    for r in reqs:
        _same(fast.score(r), m.score(r))
    for got, want in zip(fast.score_requests(reqs), m.score_requests(reqs)):  # padded batch: history and no history together
        _same(got, want)
    assert runtime_name(fast) == "onnx" and runtime_name(m) == "torch"


@pytest.mark.parametrize("ablation", [{"use_image": False}, {"use_history": False}, {"use_product": False}])
def test_onnx_scores_equal_torch_in_ablations(ablation):
    m = _model(**ablation)
    fast = OnnxRanker(m)
    for r in _requests():
        _same(fast.score(r), m.score(r))


def test_no_history_requests_run_the_graph_without_the_history_layer():
    m = _model()
    fast = OnnxRanker(m)
    with_h, without_h = (fast._sessions[flag][1] for flag in (True, False))
    assert "hist_text" in with_h and "hist_mask" in with_h
    assert not any(name.startswith("hist_") and name != "hist_mask" for name in without_h)  # the DIN inputs are not read
    _same(fast.score(_request(9, seed=4, history=False)), m.score(_request(9, seed=4, history=False)))


def test_a_graph_that_disagrees_with_torch_is_refused(monkeypatch):
    real = OnnxRanker._run

    def off_by_a_little(self, batch):
        out = real(self, batch)
        out[0] = out[0] + 10 * onnx_ranker.TOLERANCE
        return out

    monkeypatch.setattr(OnnxRanker, "_run", off_by_a_little)
    with pytest.raises(OnnxExportError, match="disagrees with torch on scores"):
        OnnxRanker(_model())


def test_cpu_runtime_falls_back_to_torch_on_auto_and_raises_on_onnx(monkeypatch, caplog):
    m = _model()
    assert cpu_runtime(m, "torch") is m
    assert isinstance(cpu_runtime(m, "auto"), OnnxRanker)
    import torch

    def broken(*a, **k):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level(logging.WARNING, logger="rerank.model.onnx_ranker"):
        assert cpu_runtime(m, "auto") is m
    assert "serving the fusion ranker with torch" in caplog.text and "unsupported operator" in caplog.text
    with pytest.raises(OnnxExportError, match="ONNX export of the fusion ranker failed: RuntimeError: unsupported operator"):
        cpu_runtime(m, "onnx")
    with pytest.raises(ConfigError, match="unknown model runtime 'tensorrt'; valid: auto, torch, onnx"):
        cpu_runtime(m, "tensorrt")


def test_export_leaves_a_training_ranker_in_training_mode():
    m = _model()
    m.train()
    OnnxRanker(m)
    assert m.training
    served = _model()
    OnnxRanker(served)
    assert not served.training  # the exporter restores the mode it found, recursively: the served ranker stays in eval mode
