"""The colour head: learned from photographed products with a filled colour field, read by the query's colours."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import fields as F
from indexing.errors import ConfigError, DimensionError, ModelArtifactError
from rerank.model.colour import COLOUR_FEATURES, ColourConfig, ColourModel, colour_vocabulary, train_colour_model
from rerank.model.inputs import PHOTO_COLOUR, FeatureSpec, build_request_features
from rerank.reranker import candidates_from_hits

NAMES = ("Black", "White", "Red", "Blue", "Green")


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
    # an artifact from before the head named its inputs (version 1) reads image_vec alone
    v1 = {k: v for k, v in m.meta().items() if k != "inputs"} | {"version": 1, "image_dim": m.input_dim}
    old = ColourModel.from_meta(v1, m.tensors())
    assert old.inputs == ((F.IMAGE_VEC, x.shape[1]),) and np.allclose(old.photo_probs(x[:3]), m.photo_probs(x[:3]), atol=1e-6)


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


def test_a_head_on_the_pixel_descriptor_and_the_image_vector_reads_both_fields(text_encoder):
    """A head whose inputs are ``image_colour`` then ``image_vec``: its rows are the two fields side by side; a photo
    without a descriptor (an index from an older mapping) is not read; the artifact check wants the field in the index."""
    from mappings import load_mapping
    from rerank.model.artifact import check_compatible
    from rerank.model.inputs import colour_fields, photo_colours

    x, y = _photos(400, seed=2)
    rng = np.random.default_rng(3)
    desc = np.abs(rng.normal(size=(len(x), 6))).astype(np.float32)  # uninformative: the colour is in x
    rows = np.hstack([desc, x])
    inputs = [(F.IMAGE_COLOUR, 6), (F.IMAGE_VEC, x.shape[1])]
    m = train_colour_model(rows, [NAMES[i] for i in y], [str(i) for i in range(len(x))], text_encoder=text_encoder,
                           config=ColourConfig(epochs=80), inputs=inputs)
    assert m.inputs == tuple(inputs) and m.fields == (F.IMAGE_COLOUR, F.IMAGE_VEC) and m.input_dim == 6 + x.shape[1]
    assert m.report["inputs"] == [F.IMAGE_COLOUR, F.IMAGE_VEC] and m.report["heldout_accuracy"] > 0.9
    assert colour_fields(m) == (F.IMAGE_COLOUR,) and colour_fields(None) == ()
    back = ColourModel.from_meta(m.meta(), m.tensors())
    assert back.inputs == m.inputs and np.allclose(back.photo_probs(rows[:4]), m.photo_probs(rows[:4]), atol=1e-6)
    docs = [{F.IMAGE_COLOUR: desc[0].tolist()}, {}, {F.IMAGE_COLOUR: desc[2]}]
    probs, mask = photo_colours(docs, x[:3], np.array([True, True, True]), m)
    assert mask.tolist() == [True, False, True]
    np.testing.assert_allclose(probs[[0, 2]], m.photo_probs(rows[[0, 2]]), atol=1e-6)
    assert (probs[1] == 0).all()
    full = [{F.IMAGE_COLOUR: d} for d in desc[:5]]
    p_all, m_all = photo_colours(full, x[:5], np.ones(5, dtype=bool), m)  # every row with a photo: read in place
    assert m_all.all()
    np.testing.assert_allclose(p_all, m.photo_probs(rows[:5]), atol=1e-6)
    p_some, m_some = photo_colours(full, x[:5], np.array([True, False, True, True, False]), m)  # photos on some rows
    assert m_some.tolist() == [True, False, True, True, False] and (p_some[[1, 4]] == 0).all()
    np.testing.assert_allclose(p_some[[0, 2, 3]], m.photo_probs(rows[[0, 2, 3]]), atol=1e-6)
    np.testing.assert_allclose(m.photo_probs_of([desc[:5], x[:5]]), m.photo_probs(rows[:5]), atol=1e-6)
    with pytest.raises(DimensionError, match="1 input matrices for its 2 inputs"):
        m.photo_probs_of([rows[:5]])
    with pytest.raises(DimensionError, match="colour head input image_colour has shape"):
        m.photo_probs_of([x[:5], desc[:5]])
    # rows of an already projected image vector (another dimension) are not read either
    _, none = photo_colours(docs, np.zeros((3, 5), dtype=np.float32), np.ones(3, dtype=bool), m)
    assert not none.any()
    with pytest.raises(ModelArtifactError, match="inputs .* add up to"):
        ColourModel(m.names, m.name_vecs, m.weight, m.bias, temperature=30.0, inputs=[(F.IMAGE_VEC, x.shape[1])])
    # the artifact check: an index without image_colour (products-v1) is refused by name, v3 with another dimension too
    config = {"encoders": {"text": {"dim": 384, "model_id": "t"}}, "colour": m.meta()}
    with pytest.raises(ModelArtifactError, match=r"reads 'image_colour'.*products-v3"):
        check_compatible(config, where="m", mapping=load_mapping("products-v1", text_dim=384, image_dim=32))
    with pytest.raises(ModelArtifactError, match=r"'image_colour' of dimension 6.*dimension 216"):
        check_compatible(config, where="m", mapping=load_mapping("products-v3", text_dim=384, image_dim=32))
    check_compatible({**config, "colour": {**m.meta(), "inputs": [[F.IMAGE_COLOUR, 216], [F.IMAGE_VEC, 32]]}}, where="m",
                     mapping=load_mapping("products-v3", text_dim=384, image_dim=32))
    check_compatible({**config, "colour": ColourModel.from_meta({**m.meta(), "inputs": [[F.IMAGE_VEC, 38]]}, m.tensors()).meta()},
                     where="m", mapping=load_mapping("products-v1", text_dim=384, image_dim=32))  # an image_vec-only head fits v1
