"""The colour head: learned from photographed products with a filled colour field, read by the query's colours."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import fields as F
from indexing.errors import ConfigError, DimensionError, ModelArtifactError
from rerank.colour import COLOUR_FEATURES, ColourConfig, ColourModel, colour_vocabulary, train_colour_model
from rerank.model_features import PHOTO_COLOUR, FeatureSpec, build_request_features
from rerank.reranker import candidates_from_hits

NAMES = ("Black", "White", "Red", "Blue", "Green")


@pytest.fixture(scope="module")
def text_encoder():
    from indexing.encoders import get_text_encoder

    return get_text_encoder("minilm", device="cpu")


def _photos(n: int, seed: int = 0, dim: int = 32):
    """Image vectors whose colour is a cluster (a learnable signal), with noise; colours drawn unevenly."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(NAMES), dim)).astype(np.float32) * 2.0
    y = rng.choice(len(NAMES), size=n, p=[0.4, 0.2, 0.15, 0.15, 0.1])
    x = centres[y] + rng.normal(size=(n, dim)).astype(np.float32)
    return x, y


def test_vocabulary_keeps_colours_with_enough_examples_case_insensitively():
    vals = ["Black", "black ", "BLACK", "Red", "red", "Teal", "", None, 3]
    assert colour_vocabulary(vals, 2) == ["Black", "Red"]
    assert colour_vocabulary(vals, 1) == ["Black", "Red", "Teal"]


def test_head_learns_colours_from_photos_and_reads_query_colours(text_encoder, tmp_path):
    x, y = _photos(900)
    values = [NAMES[i] for i in y]
    values[:50] = [""] * 50  # products without a colour field are skipped, not guessed
    ids = [f"p{i}" for i in range(len(x))]
    m = train_colour_model(x, values, ids, text_encoder=text_encoder, config=ColourConfig(min_count=5, epochs=150))
    rep = m.report
    assert set(m.names) == set(NAMES) and rep["skipped_without_colour"] == 50
    assert rep["heldout_products"] + rep["train_products"] == 850
    assert rep["heldout_accuracy"] > 0.9 > rep["majority_accuracy"]
    p = m.photo_probs(x[:20])
    assert p.shape == (20, len(NAMES)) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    # the query's colour distribution peaks on the colour it names
    for q, want in (("black leather shoes", "Black"), ("red summer dress for women", "Red"), ("men's blue jeans", "Blue")):
        r, strength = m.query_colours(text_encoder.encode([q])[0])
        assert m.names[int(np.argmax(r))] == want and 0.3 < strength <= 1.0
    # features: a black photo matches a black query better than a white one; the text field counts when it names a colour
    black, white = int(np.flatnonzero(y == 0)[0]), int(np.flatnonzero(y == 1)[0])
    qv = text_encoder.encode(["black shoes"])[0]
    f = m.features(qv, m.photo_probs(x[[black, white, black]]), np.array([True, True, False]), ["black", "White", "no such colour"])
    assert f.shape == (3, len(COLOUR_FEATURES))
    assert f[0, 1] > 0.5 > f[1, 1] and f[2, 1] == 0.0  # photo match; no photo -> 0
    assert f[0, 2] > 0.5 and f[1, 2] > 0.5 and f[2, 2] == 0.0  # the head is sure of both photos (white is not black)
    assert f[0, 3] > 0.5 > f[1, 3] and f[2, 3] == 0.0 and f[:, 4].tolist() == [1.0, 1.0, 0.0]
    # persistence inside an artifact: the same numbers back
    back = ColourModel.from_meta(m.meta(), m.tensors())
    assert np.allclose(back.photo_probs(x[:5]), m.photo_probs(x[:5]), atol=1e-6) and back.names == m.names
    with pytest.raises(DimensionError):
        m.photo_probs(np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(ModelArtifactError):
        ColourModel.from_meta({**m.meta(), "version": 99}, m.tensors())


def test_too_few_colours_is_a_clear_error(text_encoder):
    x, _ = _photos(20)
    with pytest.raises(ConfigError, match="at least 2 colours"):
        train_colour_model(x, ["Black"] * 20, [str(i) for i in range(20)], text_encoder=text_encoder)


def test_features_append_colour_columns_and_refuse_without_a_head(text_encoder):
    x, y = _photos(300, seed=1)
    m = train_colour_model(x, [NAMES[i] for i in y], [str(i) for i in range(300)], text_encoder=text_encoder, config=ColourConfig(epochs=80))
    q = text_encoder.encode(["red dress"])[0]
    docs = {"a": {F.TEXT_VEC: q.tolist(), F.IMAGE_VEC: x[0].tolist(), F.COLOUR: "Red"},
            "b": {F.TEXT_VEC: q.tolist(), F.IMAGE_VEC: x[1].tolist()},
            "c": {F.TEXT_VEC: q.tolist(), F.IMAGE_VEC: x[1].tolist(), PHOTO_COLOUR: np.eye(len(m.names), dtype=np.float32)[m.names.index("Red")]}}
    cands = list(candidates_from_hits(["a", "b", "c"], [3.0, 2.0, 1.0]))
    plain, spec = FeatureSpec(), FeatureSpec(colour=True)
    assert spec.first_stage_dim == plain.first_stage_dim + len(COLOUR_FEATURES)
    identity = lambda v: v[:, : len(q)] if v.shape[1] >= len(q) else np.pad(v, ((0, 0), (0, len(q) - v.shape[1])))  # noqa: E731
    req = build_request_features(q, cands, docs, spec, project=identity, text_dim=len(q), image_dim=x.shape[1], colour=m)
    base = build_request_features(q, cands, docs, plain, project=identity, text_dim=len(q), image_dim=x.shape[1])
    assert req.first_stage.shape == (3, spec.first_stage_dim)
    assert np.array_equal(req.first_stage[:, : plain.first_stage_dim], base.first_stage)
    col = req.first_stage[:, plain.first_stage_dim:]
    assert col[0, 4] == 1.0 and col[1, 4] == 0.0  # the colour field of "a" names a known colour
    assert col[2, 1] > 0.5 and col[2, 2] == 1.0  # the precomputed photo reading is used as given
    assert np.allclose(col[:2, 1], m.features(q, m.photo_probs(x[:2]), np.array([True, True]), ["Red", None])[:, 1], atol=1e-6)
    without_photos = build_request_features(q, cands, docs, spec, project=None, text_dim=len(q), image_dim=x.shape[1], colour=m)
    assert (without_photos.first_stage[:, plain.first_stage_dim + 1] == 0).all()  # images masked -> no photo match
    with pytest.raises(ConfigError, match="no colour head"):
        build_request_features(q, cands, docs, spec, project=identity, text_dim=len(q), image_dim=x.shape[1])
