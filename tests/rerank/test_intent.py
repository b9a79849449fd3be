"""The query-intent bound: the product type a query names outranks the model's (and the history's) preference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexing import fields as F
from indexing.errors import ConfigError, DimensionError, ModelArtifactError
from rerank.model.intent import CATALOG, IntentConfig, IntentModel, bound_scores, build_intent_model, intent_vocabularies, product_attribute

CATALOG_DOCS = [
    {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Black", F.GENDER: "Women", F.USAGE: "Casual"},
    {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Red", F.GENDER: "Women", F.USAGE: "Formal"},
    {F.ARTICLE_TYPE: "Sandals", F.COLOUR: "Red", F.GENDER: "Women", F.USAGE: "Casual"},
    {F.ARTICLE_TYPE: "Flats", F.COLOUR: "", F.GENDER: "Women"},
    {F.ARTICLE_TYPE: "Tshirts", F.COLOUR: "Blue", F.GENDER: "Men", F.USAGE: "Sports"},
    {F.ARTICLE_TYPE: "Shirts", F.GENDER: "Men", F.USAGE: "Formal"},
    {F.ARTICLE_TYPE: "Casual Shoes", F.COLOUR: "White", F.GENDER: "Men", F.USAGE: "Casual"},
    {F.ARTICLE_TYPE: "Sports Shoes", F.COLOUR: "Black", F.GENDER: "Men", F.USAGE: "Sports"},
    {F.ARTICLE_TYPE: "Handbags", F.COLOUR: "Brown", F.GENDER: "Women", F.USAGE: "Casual"},
]


def test_product_attribute_reads_the_catalog_field_and_says_so():
    assert product_attribute({F.ARTICLE_TYPE: " Heels "}, F.ARTICLE_TYPE) == ("Heels", CATALOG, 1.0)
    for doc in ({F.ARTICLE_TYPE: ""}, {F.ARTICLE_TYPE: "  "}, {F.ARTICLE_TYPE: None}, {}, None, {F.ARTICLE_TYPE: 3}):
        assert product_attribute(doc, F.ARTICLE_TYPE) == (None, None, 0.0)


def test_product_attribute_falls_back_to_the_value_completed_from_the_photo():
    doc = {F.COLOUR: "", F.COMPLETED_ATTRIBUTES: ["colour"], F.PHOTO_COLOUR: "Navy Blue", F.PHOTO_COLOUR_CONFIDENCE: 0.91,
           F.PHOTO_ARTICLE_TYPE: "Heels", F.PHOTO_ARTICLE_TYPE_CONFIDENCE: 0.99}
    assert product_attribute(doc, F.COLOUR) == ("Navy Blue", "photo", 0.91)
    # a prediction indexing did not complete (the catalog had no gap there, or the confidence was low) is not read
    assert product_attribute(doc, F.ARTICLE_TYPE) == (None, None, 0.0)
    # the catalog's own value always wins
    assert product_attribute({**doc, F.COLOUR: "Black"}, F.COLOUR) == ("Black", CATALOG, 1.0)


def test_vocabularies_are_the_catalogs_values_by_count():
    v = intent_vocabularies(CATALOG_DOCS + [{F.ARTICLE_TYPE: "heels"}, {F.SEASON: "Summer"}])
    assert v[F.ARTICLE_TYPE][0] == "Heels" and "heels" not in v[F.ARTICLE_TYPE]  # case-insensitive, first spelling kept
    assert set(v) == {F.ARTICLE_TYPE, F.COLOUR, F.GENDER, F.USAGE} and "" not in v[F.COLOUR]
    assert intent_vocabularies(CATALOG_DOCS, min_count=2)[F.ARTICLE_TYPE] == ["Heels"]
    assert intent_vocabularies([{F.TITLE: "hammer"}]) == {}


def test_no_intent_model_for_a_catalog_of_titles_only(text_encoder):
    assert build_intent_model([{F.TITLE: "claw hammer"}, {F.TITLE: "paint roller"}], text_encoder=text_encoder) is None


def test_the_named_type_puts_contradicting_products_a_tier_down(intent, text_encoder):
    docs = [{F.ARTICLE_TYPE: "Sandals", F.COLOUR: "Red"}, {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Black"}, None,
            {F.ARTICLE_TYPE: "Flats"}, {F.ARTICLE_TYPE: "Stilettos of a new season"}, {F.ARTICLE_TYPE: "heels"}]
    a = intent.assess(text_encoder.encode(["heels"])[0], docs)
    assert a.query.names[F.ARTICLE_TYPE] == "Heels" and a.query.named[F.ARTICLE_TYPE]
    # sandals and flats contradict; heels agree (any case); an unknown product or a type the catalog never had stays put
    assert a.tiers.tolist() == [1, 0, 0, 1, 0, 0]
    ex = a.explain(0, 2.5)
    assert ex["tier"] == 1 and ex["model_score"] == 2.5
    assert ex["attributes"][F.ARTICLE_TYPE] == {"query": "Heels", "strength": pytest.approx(1.0, abs=1e-3), "product": "Sandals",
                                                "source": CATALOG, "confidence": 1.0, "agrees": False, "bounds": True}
    assert a.explain(2)["attributes"][F.ARTICLE_TYPE]["agrees"] is None and "model_score" not in a.explain(2)
    # a query that names a type and a colour: the colour is shown (agreement per product) but does not bound by default
    b = intent.assess(text_encoder.encode(["black heels for women"])[0], docs)
    assert b.tiers.tolist() == [1, 0, 0, 1, 0, 0]
    col = b.explain(0)["attributes"][F.COLOUR]
    assert col["query"] == "Black" and col["product"] == "Red" and col["agrees"] is False and col["bounds"] is False
    assert b.explain(1)["attributes"][F.COLOUR]["agrees"] is True
    scores = np.linspace(1.0, -1.0, len(docs))
    assert b.explain_all(scores) == [b.explain(i, scores[i]) for i in range(len(docs))]  # the serving path's batch form


def test_a_close_second_type_is_not_contradicted_and_a_vague_query_bounds_nothing(intent, text_encoder):
    docs = [{F.ARTICLE_TYPE: t} for t in ("Tshirts", "Shirts", "Heels", "Handbags")]
    a = intent.assess(text_encoder.encode(["t-shirt"])[0], docs)
    assert a.tiers[:2].tolist() == [0, 0] and a.tiers[2:].tolist() == [1, 1]  # t-shirts and shirts are within the margin
    vague = intent.assess(text_encoder.encode(["something nice for the weekend"])[0], docs)
    assert not vague.query.named[F.ARTICLE_TYPE] and vague.tiers.tolist() == [0, 0, 0, 0]


def test_colour_can_bound_when_configured(text_encoder):
    m = build_intent_model(CATALOG_DOCS, text_encoder=text_encoder, config=IntentConfig(bound=(F.ARTICLE_TYPE, F.COLOUR), min_strength=0.4, show_strength=0.4))
    docs = [{F.ARTICLE_TYPE: "Heels", F.COLOUR: "Red"}, {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Black"}, {F.ARTICLE_TYPE: "Sandals", F.COLOUR: "Black"},
            {F.ARTICLE_TYPE: "Sandals", F.COLOUR: "Red"}, {F.ARTICLE_TYPE: "Heels"}]
    a = m.assess(text_encoder.encode(["black heels"])[0], docs)
    assert a.tiers.tolist() == [1, 0, 1, 2, 0]
    with pytest.raises(ConfigError, match="season"):
        IntentConfig(bound=("season",))
    with pytest.raises(ConfigError):
        IntentConfig(margin=-0.1)


def test_bound_scores_orders_by_tier_then_score():
    scores = np.array([9.0, 1.0, 5.0, -3.0, 5.0])
    tiers = np.array([1, 0, 0, 0, 2])
    b = bound_scores(scores, tiers)
    order = sorted(range(5), key=lambda i: (-b[i], i))
    assert order == [2, 1, 3, 0, 4]  # tier 0 by score (5, 1, -3), then tier 1, then tier 2, whatever their scores
    assert np.array_equal(bound_scores(scores, np.zeros(5, dtype=int)), scores)  # no contradiction: the scores unchanged
    assert bound_scores([], np.zeros(0)).shape == (0,)
    with pytest.raises(DimensionError):
        bound_scores(scores, tiers[:3])


def test_persistence_round_trip_and_refusals(intent, text_encoder):
    meta, tensors = intent.meta(), intent.tensors()
    back = IntentModel.from_meta(json.loads(json.dumps(meta)), tensors)
    q = text_encoder.encode(["red sandals"])[0]
    assert back.names == intent.names and back.config == intent.config
    assert back.assess(q, CATALOG_DOCS).tiers.tolist() == intent.assess(q, CATALOG_DOCS).tiers.tolist()
    with pytest.raises(ModelArtifactError, match="version"):
        IntentModel.from_meta({**meta, "version": 99}, tensors)
    with pytest.raises(ModelArtifactError, match="article_type.name_vecs is missing"):
        IntentModel.from_meta(meta, {k: v for k, v in tensors.items() if not k.startswith(F.ARTICLE_TYPE)})
    with pytest.raises(DimensionError):
        intent.assess(np.zeros(7, dtype=np.float32), CATALOG_DOCS)


def test_the_intent_block_travels_in_the_artifact_and_old_artifacts_load_unbounded(intent, tmp_path):
    from rerank.model.artifact import EncoderRef, load_artifact, save_artifact
    from rerank.model.ranker import RankerConfig, build_ranker
    from rerank.model.inputs import FeatureSpec

    spec = FeatureSpec(history_k=4)
    cfg = RankerConfig(text_dim=intent.text_dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                       history_k=spec.history_k, d_model=16, hidden=32, heads=2)
    save_artifact(tmp_path / "m", build_ranker(cfg, device="cpu", seed=1), feature_spec=spec, text_encoder=EncoderRef("minilm:x", intent.text_dim),
                  image_encoder=None, intent=intent)
    art = load_artifact(tmp_path / "m", device="cpu")
    assert art.intent is not None and art.intent.names == intent.names
    save_artifact(tmp_path / "old", build_ranker(cfg, device="cpu", seed=1), feature_spec=spec, text_encoder=EncoderRef("minilm:x", intent.text_dim),
                  image_encoder=None)
    assert load_artifact(tmp_path / "old", device="cpu").intent is None
    # name vectors of another text space than the artifact's encoder are refused, naming both
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    c["encoders"]["text"]["dim"] = 8
    c["ranker"]["text_dim"] = 8
    (tmp_path / "m" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelArtifactError):
        load_artifact(tmp_path / "m", device="cpu")
