"""The ``onnx-q8`` text backend: MiniLM exported from its torch weights, matmuls at 8 bits (real weights, real texts)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from indexing.encoders import (
    AUTO_QUERY_BACKEND,
    PROBE_TEXTS,
    check_agreement,
    select_query_encoder,
    text_encoder_info,
)
from indexing.errors import ConfigError, EncoderError
from indexing.onnx_runtime import RECIPE, dequantize_blocks, quantize_blocks, quantize_matmuls

QUERIES = ["black formal shoes for men", "women's green handbags", "navy blue shirt", "heels", "2x4 lumber 8 ft",
           "BEHR Premium Textured DeckOver 1-gal. #SC-141 Tugboat Wood and Concrete Coating", "kurta", "cordless drill"]


# ------------------------------------------------------------------------------ the quantizer


def test_quantize_blocks_round_trips_within_half_a_step_per_block():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(70, 5)).astype(np.float32)  # K = 70: not a multiple of 32, padded to 3 blocks
    w[:32, 1] = 0.0  # an all-zero block
    w[40, 2] = 25.0  # an outlier widens its block's step only
    q, s = quantize_blocks(w, 32)
    assert q.shape == (5, 3, 32) and q.dtype == np.uint8 and s.shape == (5, 3) and s.dtype == np.float32
    assert q.min() >= 1 and q.max() <= 255  # symmetric: q + 128 in [1, 255]
    back = dequantize_blocks(q, s, 70)
    assert back.shape == w.shape
    step = np.repeat(s.T, 32, axis=0)[:70]  # each weight's block scale
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
    assert np.all(back[:32, 1] == 0.0)
    assert np.abs(back[:32, 2] - w[:32, 2]).max() < np.abs(back[32:64, 2] - w[32:64, 2]).max()  # the outlier's block only
    with pytest.raises(ValueError, match="2-d"):
        quantize_blocks(np.zeros(4, dtype=np.float32))


def test_quantize_matmuls_replaces_weight_matmuls_only_and_onnxruntime_computes_them():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(64, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]), helper.make_node("MatMul", ["x", "x_t"], ["g"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
                                           helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [64, "m"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
                               helper.make_tensor_value_info("g", TensorProto.FLOAT, ["n", "m"])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model, n = quantize_matmuls(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert n == 2  # the matmul of two inputs has no weight to quantize
    ops = [x.op_type for x in model.graph.node]
    assert ops == ["MatMulNBits", "Relu", "MatMulNBits", "MatMul"]
    assert {t.name for t in model.graph.initializer} == {"w1_q8", "w1_q8_scales", "w2_q8", "w2_q8_scales"}
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(3, 64)).astype(np.float32)
    y, g = sess.run(None, {"x": x, "x_t": x.T.copy()})
    exact = np.maximum(x @ w1, 0) @ w2
    assert np.allclose(g, x @ x.T, atol=1e-4)
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    assert 0 < rel < 0.03  # int8 weights and activations: close, not equal


# ------------------------------------------------------------------------------ the backend


def test_q8_model_id_names_the_torch_weights_and_the_recipe():
    t, q = text_encoder_info(backend="torch"), text_encoder_info(backend="onnx-q8")
    assert q.weights == t.weights and q.dim == t.dim == 384
    sha = hashlib.sha256(Path(t.weights[0]).read_bytes()).hexdigest()
    recipe_sha = hashlib.sha256((sha + "\n" + RECIPE).encode()).hexdigest()
    assert q.model_id == f"minilm:{recipe_sha[:12]}:384"
    assert q.model_id not in (t.model_id, text_encoder_info(backend="onnx-int8").model_id)


def test_q8_encodes_like_the_torch_model(text_torch, text_q8):
    assert text_q8.backend == "onnx-q8" and text_q8.device == "cpu" and text_q8.model_id == text_encoder_info(backend="onnx-q8").model_id
    a, b = text_torch.encode(QUERIES), text_q8.encode(QUERIES)
    assert b.shape == (len(QUERIES), 384) and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = np.sum(a * b, axis=1)
    assert cos.min() > 0.998 and cos.max() < 1.0 - 1e-7  # quantized: near, never identical
    assert check_agreement(text_torch, text_q8) >= 0.998
    # batched (padded) and one at a time agree: the attention mask keeps padding out
    one = np.stack([text_q8.encode([q])[0] for q in QUERIES])
    assert np.allclose(one, b, atol=2e-3)
    # the nearest product title of each query is the same under both encoders
    titles = text_q8.encode(list(PROBE_TEXTS)), text_torch.encode(list(PROBE_TEXTS))
    assert np.array_equal(np.argmax(b @ titles[0].T, axis=1), np.argmax(a @ titles[1].T, axis=1))


def test_q8_runs_on_the_cpu_only():
    from indexing.encoders import _MiniLM

    with pytest.raises(EncoderError, match="'onnx-q8' runs on the CPU only"):  # refused before any export
        _MiniLM.load("onnx-q8", "cuda")


# ------------------------------------------------------------------------------ choosing the query encoder


def test_select_query_encoder_auto_takes_q8_on_the_cpu(text_torch, text_q8):
    enc, why = select_query_encoder(text_torch, "auto", text_model="minilm")
    assert AUTO_QUERY_BACKEND == "onnx-q8"
    assert enc is text_q8 and why.startswith("auto: onnx-q8 (smallest cosine 0.99")
    same, why = select_query_encoder(text_q8, "auto", text_model="minilm")  # an index built with onnx-q8 keeps it
    assert same is text_q8 and "the index encoder" in why
    assert select_query_encoder(text_torch, None, text_model="minilm")[0] is text_torch
    assert select_query_encoder(text_torch, "torch", text_model="minilm")[0] is text_torch
    enc, why = select_query_encoder(text_torch, "onnx-int8", text_model="minilm")
    assert enc.backend == "onnx-int8" and why.startswith("onnx-int8 (smallest cosine")


class _Other:
    """A reference encoder that disagrees with MiniLM (its vectors are permuted): no stand-in may replace it."""

    backend, device, dim, model_id = "torch", "cpu", 384, "other:000000000000:384"

    def __init__(self, enc):
        self.enc = enc

    def encode(self, texts):
        return self.enc.encode(texts)[:, ::-1].copy()


def test_select_query_encoder_auto_keeps_the_index_encoder_when_q8_disagrees_and_explicit_refuses(text_torch, caplog):
    other = _Other(text_torch)
    with caplog.at_level(logging.WARNING, logger="indexing.encoders"):
        enc, why = select_query_encoder(other, "auto", text_model="minilm")
    assert enc is other and "onnx-q8 not used" in why and "disagrees" in why
    assert "onnx-q8 not used" in caplog.text
    with pytest.raises(ConfigError, match="disagrees with the index's 'other:000000000000:384'"):
        select_query_encoder(other, "onnx-q8", text_model="minilm")


def test_select_query_encoder_auto_keeps_a_faster_index_encoder(text_q8, text_onnx, monkeypatch):
    import indexing.encoders as E

    ref = text_onnx
    monkeypatch.setattr(E, "probe_ms", lambda enc, texts=PROBE_TEXTS: 5.0 if enc is text_q8 else 1.0)  # a CPU without int8 kernels
    enc, why = select_query_encoder(ref, "auto", text_model="minilm")
    assert enc is ref and "onnx-q8 not faster: 5.00 vs 1.00 ms" in why


def test_a_failed_export_is_an_encoder_error_naming_the_backend(tmp_path, monkeypatch):
    import torch

    from indexing import onnx_runtime as onnx_text
    from indexing.encoders import _MiniLM

    with pytest.raises(EncoderError, match="could not be loaded for the ONNX export"):
        onnx_text.build_q8_model(tmp_path)  # no checkpoint there

    def broken(*a, **k):
        raise RuntimeError("tracer exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(EncoderError, match="'onnx-q8': exporting or quantizing .* RuntimeError: tracer exploded"):
        onnx_text.build_q8_model(_MiniLM._model_dir())


# ------------------------------------------------------------------------------ the on-disk cache of built models


def test_a_built_model_is_kept_on_disk_and_the_next_load_skips_the_build(tmp_path, monkeypatch, request, text_q8):
    from indexing import onnx_runtime as onnx_text
    from indexing.encoders import _MiniLM

    onnx_text.configure_cache_dir(tmp_path)  # what the process edge does with FUSIONRANK_CACHE_DIR
    request.addfinalizer(lambda: onnx_text.configure_cache_dir(None))
    model_id = text_encoder_info(backend="onnx-q8").model_id
    first = _MiniLM.load("onnx-q8", "cpu")  # a real export and quantization, stored in tmp_path
    path = onnx_text.cache_path(tmp_path, model_id)
    assert path.parent == tmp_path / "onnx-q8" and path.name.startswith("minilm_") and path.suffix == ".onnx"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == path.with_suffix(".sha256").read_text().strip()
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left behind

    def no_build(*a, **k):
        raise AssertionError("the cached model was built again")

    monkeypatch.setattr(onnx_text, "build_q8_model", no_build)
    again = _MiniLM.load("onnx-q8", "cpu")
    assert again.model_id == first.model_id == text_q8.model_id
    assert np.allclose(again.encode(QUERIES), first.encode(QUERIES), atol=1e-6)
    assert np.allclose(again.encode(QUERIES), text_q8.encode(QUERIES), atol=1e-6)


def test_a_corrupt_unwritable_or_disabled_cache_costs_a_build_never_a_failure(tmp_path, monkeypatch, caplog):
    from indexing import onnx_runtime as onnx_text

    built = []

    def fake_build(model_dir):  # the real builder is tested above; this counts the builds the cache could not spare
        built.append(model_dir)
        return f"model {len(built)}".encode()

    monkeypatch.setattr(onnx_text, "build_q8_model", fake_build)
    md = tmp_path / "checkpoint"
    cache = tmp_path / "cache"
    assert onnx_text.load_q8_model(md, "minilm:abc:384", directory=cache) == b"model 1"
    assert onnx_text.load_q8_model(md, "minilm:abc:384", directory=cache) == b"model 1" and len(built) == 1
    other = onnx_text.load_q8_model(md, "minilm:def:384", directory=cache)  # another model id: another file
    assert other == b"model 2" and onnx_text.cache_path(cache, "minilm:def:384") != onnx_text.cache_path(cache, "minilm:abc:384")

    path = onnx_text.cache_path(cache, "minilm:abc:384")
    path.write_bytes(b"model 1, torn")  # a damaged file: its checksum no longer matches
    with caplog.at_level(logging.WARNING, logger="indexing.onnx_runtime"):
        assert onnx_text.load_q8_model(md, "minilm:abc:384", directory=cache) == b"model 3"
    assert "does not match its checksum" in caplog.text
    assert path.read_bytes() == b"model 3" and onnx_text.load_q8_model(md, "minilm:abc:384", directory=cache) == b"model 3"
    assert len(built) == 3

    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="indexing.onnx_runtime"):
        assert onnx_text.load_q8_model(md, "minilm:abc:384", directory=blocked) == b"model 4"
    assert "could not cache the onnx-q8 model" in caplog.text and blocked.read_text() == "not a directory"

    assert onnx_text.load_q8_model(md, "minilm:abc:384", directory=None) == b"model 5"  # no cache: built, nothing written
    from workers.settings import apply_process_settings, load_settings

    try:
        for off in ("off", "0", ""):
            monkeypatch.setenv("FUSIONRANK_CACHE_DIR", off)
            apply_process_settings(load_settings())
            assert onnx_text.cache_dir() is None
        monkeypatch.setenv("FUSIONRANK_CACHE_DIR", str(tmp_path / "mine"))
        apply_process_settings(load_settings())
        assert onnx_text.cache_dir() == tmp_path / "mine"
    finally:
        onnx_text.configure_cache_dir(None)
    monkeypatch.delenv("FUSIONRANK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_text.cache_dir() == tmp_path / "xdg" / "fusionrank"
    assert onnx_text.load_q8_model(md, "minilm:abc:384") == b"model 6"  # the default directory
    assert onnx_text.cache_path(tmp_path / "xdg" / "fusionrank", "minilm:abc:384").read_bytes() == b"model 6"
