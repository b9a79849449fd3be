"""Text-image alignment: the contrastive projection, its persistence, and the query map into image space."""

from __future__ import annotations

import numpy as np
import pytest

from indexing.errors import ConfigError, DimensionError, ModelArtifactError
from rerank.model.alignment import Alignment, AlignmentConfig, align_catalog, holdout_mask, read_pairs, recall_at_k, train_alignment


def _paired(n: int, seed: int = 0, noise: float = 0.3):
    """Images that are a fixed linear function of their texts plus noise (a learnable pairing)."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n, 24)).astype(np.float32)
    mix = rng.normal(size=(24, 40)).astype(np.float32)
    image = text @ mix + noise * rng.normal(size=(n, 40)).astype(np.float32)
    return text, image, [f"p{i}" for i in range(n)]


def test_holdout_is_seeded_by_product_and_near_the_fraction():
    ids = [str(i) for i in range(5000)]
    a, b = holdout_mask(ids, 0.2, 13), holdout_mask(ids, 0.2, 13)
    assert (a == b).all()
    assert 0.17 < a.mean() < 0.23
    assert (holdout_mask(ids, 0.2, 14) != a).any()
    # membership depends on the id only, not on the list it is in
    assert holdout_mask(ids[::-1], 0.2, 13)[::-1].tolist() == a.tolist()


def test_recall_at_k_bounds():
    x = np.eye(20, dtype=np.float32)
    assert recall_at_k(x, x, 1) == 1.0
    assert recall_at_k(x, np.roll(x, 1, axis=0), 1) == 0.0


def test_training_learns_a_pairing_and_round_trips(tmp_path):
    text, image, ids = _paired(600)
    al = train_alignment(text, image, ids, AlignmentConfig(epochs=15, holdout=0.25, batch_size=128, lr=5e-3))
    r = al.report
    assert r["heldout_pairs"] + r["train_pairs"] == 600
    assert r["recall_at_10"] > 5 * r["chance_recall_at_10"]
    assert r["recall_at_10"] > r["baseline_recall_at_10"]
    proj = al.project(image[:5])
    assert proj.shape == (5, 24)
    assert np.allclose(np.linalg.norm(proj, axis=1), 1.0, atol=1e-5)
    back = Alignment.load(al.save(tmp_path / "al"))
    assert np.allclose(back.project(image[:5]), proj, atol=1e-6)
    with pytest.raises(DimensionError):
        al.project(np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(ModelArtifactError):
        Alignment.load(tmp_path / "nothing-here")


def test_query_to_image_space_ranks_like_the_aligned_dot_product():
    text, image, ids = _paired(400, seed=1)
    al = train_alignment(text, image, ids, AlignmentConfig(epochs=8, holdout=0.2, batch_size=128, lr=5e-3))
    q = text[3]
    raw = al.query_to_image_space(q)
    assert raw.shape == (40,) and abs(float(np.linalg.norm(raw)) - 1.0) < 1e-5
    # W^T q . x equals q . (W x) up to the bias term, which is the same for every image
    w = al.head.linear.weight.detach().numpy()
    exact = (image @ w.T) @ q
    approx = image @ raw
    assert np.corrcoef(exact, approx)[0, 1] > 0.999
    # and the exact cosine in the aligned space agrees closely with it
    assert np.corrcoef(al.image_scores(q, image), approx)[0, 1] > 0.8


def test_mlp_head_has_no_query_map_and_bad_configs_are_refused():
    text, image, ids = _paired(100, seed=2)
    al = train_alignment(text, image, ids, AlignmentConfig(hidden=16, epochs=1, holdout=0.2, batch_size=32))
    with pytest.raises(ConfigError, match="linear"):
        al.query_to_image_space(text[0])
    assert al.image_scores(text[0], image).shape == (100,)
    with pytest.raises(ConfigError):
        AlignmentConfig(holdout=1.0)
    with pytest.raises(ConfigError):
        train_alignment(text, image, ids, AlignmentConfig(holdout=0.999))
    with pytest.raises(DimensionError):
        train_alignment(text, image[:50], ids, AlignmentConfig())


@pytest.mark.slow
def test_real_catalog_pairs_align_far_above_chance(shared_data, tmp_path):
    """600 real (full title, photo) pairs of the fashion catalog; 30% held out by product."""
    from indexing.encoders import get_image_encoder, get_text_encoder

    products = shared_data / "fashion" / "products.csv"
    pairs = read_pairs(products, shared_data / "fashion")
    assert len(pairs) == 9583  # every photo of the catalog
    te, ie = get_text_encoder("minilm", device="cpu"), get_image_encoder("efficientnet_lite0", device="cpu")
    cfg = AlignmentConfig(epochs=10, holdout=0.3, batch_size=128)
    al = align_catalog(products, shared_data / "fashion", text_encoder=te, image_encoder=ie, cache_dir=tmp_path, config=cfg, limit=600)
    r = al.report
    assert r["pairs"] == 600 and 140 < r["heldout_pairs"] < 220
    # measured: ~0.8 against a chance of ~0.06; the untrained projection is at chance
    assert r["recall_at_10"] > 5 * r["chance_recall_at_10"]
    assert r["baseline_recall_at_10"] < 3 * r["chance_recall_at_10"]
    assert r["image_model_id"] == ie.model_id and r["text_model_id"] == te.model_id
    # features are cached by model id: a second run reads them (no encoder needed)
    cached = list((tmp_path / "features").glob("*/*.npz"))
    assert len(cached) == 2
