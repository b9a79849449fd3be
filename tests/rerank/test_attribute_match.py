"""Query-to-attribute agreement inputs: the catalog's value where there is one, the photo-completed one where not."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import fields as F
from indexing.errors import ConfigError, ModelArtifactError
from rerank.model.attribute_match import ATTRIBUTE_MATCH_FEATURES, PER_ATTRIBUTE, match_features, product_values
from rerank.model.inputs import FeatureSpec, build_request_features
from rerank.model.intent import INTENT_ATTRIBUTES
from rerank.retrieval.retriever import Candidate

CATALOG_DOCS = [
    {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Black", F.GENDER: "Women", F.USAGE: "Casual"},
    {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Red", F.GENDER: "Women", F.USAGE: "Formal"},
    {F.ARTICLE_TYPE: "Sandals", F.COLOUR: "Navy Blue", F.GENDER: "Women", F.USAGE: "Casual"},
    {F.ARTICLE_TYPE: "Tshirts", F.COLOUR: "Blue", F.GENDER: "Men", F.USAGE: "Sports"},
    {F.ARTICLE_TYPE: "Casual Shoes", F.COLOUR: "White", F.GENDER: "Men", F.USAGE: "Casual"},
    {F.ARTICLE_TYPE: "Handbags", F.COLOUR: "Brown", F.GENDER: "Women", F.USAGE: "Casual"},
]


def col(attr: str, what: str) -> int:
    return ATTRIBUTE_MATCH_FEATURES.index(f"{attr}_{what}")


def photo(value: str, conf: float, **extra) -> dict:
    """A products-v4 document whose colour the catalog lacks and indexing completed from the photo."""
    return {F.ARTICLE_TYPE: "Heels", F.COLOUR: "", F.COMPLETED_ATTRIBUTES: ["colour"], F.PHOTO_COLOUR: value, F.PHOTO_COLOUR_CONFIDENCE: conf, **extra}


def test_layout_is_five_columns_per_intent_attribute():
    assert len(ATTRIBUTE_MATCH_FEATURES) == len(INTENT_ATTRIBUTES) * len(PER_ATTRIBUTE) == 20
    assert FeatureSpec(attributes=("catalog", "photo")).first_stage_dim == FeatureSpec().first_stage_dim + 20
    assert FeatureSpec.from_dict(FeatureSpec(attributes=["catalog"]).to_dict()).attributes == ("catalog",)
    # an artifact saved before the inputs existed has no "attributes" key: it builds what it was trained on
    old = {k: v for k, v in FeatureSpec().to_dict().items() if k != "attributes"}
    assert FeatureSpec.from_dict(old).attributes == () and FeatureSpec.from_dict(old).first_stage_dim == FeatureSpec().first_stage_dim
    with pytest.raises(ConfigError, match="valid: catalog, photo"):
        FeatureSpec(attributes=("pixels",))
    with pytest.raises(ConfigError, match="lack 'catalog'"):
        FeatureSpec(attributes=("photo",))


def test_catalog_value_agrees_with_the_named_colour_and_photo_value_fills_the_gap(intent, text_encoder):
    q = text_encoder.encode(["black heels"])[0]
    docs = [
        {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Black"},  # catalog says black
        {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Red"},  # catalog says red
        photo("Black", 0.93),  # the photo says black
        photo("Red", 0.91),  # the photo says red
        {F.ARTICLE_TYPE: "Heels", F.COLOUR: ""},  # nobody knows
        photo("Black", 0.3),  # the photo is unsure: below the intent model's min_confidence, not read
        {**photo("Red", 0.99), F.COLOUR: "Black"},  # the catalog wins over the photo
        photo("Chartreuse", 0.95),  # a value the vocabulary never had: unknown
        None,
    ]
    x = match_features(intent, q, product_values(intent, docs, ("catalog", "photo")))
    assert x.shape == (len(docs), 20) and x.dtype == np.float32
    c = lambda w: x[:, col(F.COLOUR, w)]  # noqa: E731
    assert np.allclose(c("query_strength"), c("query_strength")[0]) and c("query_strength")[0] > 0.5
    assert c("catalog_known").tolist() == [1, 1, 0, 0, 0, 0, 1, 0, 0]
    assert c("catalog_agreement")[0] == pytest.approx(1.0) and c("catalog_agreement")[1] < 0.5 * c("catalog_agreement")[0]
    assert c("catalog_agreement")[6] == pytest.approx(1.0)
    assert c("photo_confidence").tolist() == pytest.approx([0, 0, 0.93, 0.91, 0, 0, 0, 0, 0])
    assert c("photo_agreement")[2] == pytest.approx(1.0) and c("photo_agreement")[3] < 0.5
    assert c("photo_agreement")[[0, 1, 4, 5, 6, 7, 8]].tolist() == [0.0] * 7
    # the type: every heel agrees from the catalog
    assert x[[0, 1, 2, 3], col(F.ARTICLE_TYPE, "catalog_agreement")].tolist() == pytest.approx([1.0] * 4)


def test_the_no_image_ablation_reads_no_photo_value(intent, text_encoder):
    q = text_encoder.encode(["black heels"])[0]
    docs = [photo("Black", 0.93), {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Black"}]
    with_photo = match_features(intent, q, product_values(intent, docs, ("catalog", "photo")))
    catalog_only = match_features(intent, q, product_values(intent, docs, ("catalog",)))
    photo_cols = [col(a, w) for a in INTENT_ATTRIBUTES for w in ("photo_confidence", "photo_agreement")]
    assert with_photo[0, photo_cols].max() > 0.9 and catalog_only[:, photo_cols].max() == 0.0
    assert np.array_equal(with_photo[1], catalog_only[1])


def test_agreement_falls_with_the_cosine_gap_to_the_named_value(intent, text_encoder):
    q = text_encoder.encode(["navy sandals"])[0]
    names = ["Navy Blue", "Blue", "White", "Brown"]
    a = match_features(intent, q, product_values(intent, [{F.COLOUR: n} for n in names], ("catalog",)))[:, col(F.COLOUR, "catalog_agreement")]
    assert a[0] == pytest.approx(1.0) and (a[1:] < 0.5).all()  # "navy" names Navy Blue
    cos = text_encoder.encode([n.lower() for n in names]) @ q / np.linalg.norm(q)
    cos = cos / np.linalg.norm(text_encoder.encode([n.lower() for n in names]), axis=1)
    assert np.argsort(-a, kind="stable").tolist() == np.argsort(-cos, kind="stable").tolist()


def test_request_features_carry_the_columns_and_need_the_intent_model(intent, text_encoder):
    q = text_encoder.encode(["black heels"])[0]
    cands = [Candidate("a", 1.0, 1, {}), Candidate("b", 0.5, 2, {})]
    docs = {"a": {F.TEXT_VEC: q.tolist(), F.ARTICLE_TYPE: "Heels", F.COLOUR: "Red"}, "b": {F.TEXT_VEC: q.tolist(), **photo("Black", 0.9)}}
    spec = FeatureSpec(attributes=("catalog", "photo"))
    r = build_request_features(q, cands, docs, spec, intent=intent)
    base = FeatureSpec().first_stage_dim
    assert r.first_stage.shape == (2, spec.first_stage_dim)
    tail = r.first_stage[:, base:]
    assert tail[1, col(F.COLOUR, "photo_agreement")] == pytest.approx(1.0) and tail[0, col(F.COLOUR, "catalog_agreement")] < 0.5
    # the prepared half (the rerank call builds it while the query encodes) gives the same inputs
    from rerank.model.inputs import prepare_request_features

    p = prepare_request_features(cands, docs, spec, text_dim=len(q), intent=intent).finish(q)
    assert np.array_equal(p.first_stage, r.first_stage)
    with pytest.raises(ConfigError, match="no intent model"):
        build_request_features(q, cands, docs, spec)
    # without the inputs in the spec the intent model changes nothing
    assert build_request_features(q, cands, docs, FeatureSpec(), intent=intent).first_stage.shape == (2, base)


def test_an_artifact_with_the_inputs_but_no_intent_block_is_refused(tmp_path):
    from rerank.model.artifact import EncoderRef, load_artifact, save_artifact
    from rerank.model.ranker import FusionRanker, RankerConfig

    spec = FeatureSpec(attributes=("catalog",))
    model = FusionRanker(RankerConfig(text_dim=8, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                                      hash_buckets=spec.hash_buckets, history_k=spec.history_k, use_image=False))
    save_artifact(tmp_path / "m", model, feature_spec=spec, text_encoder=EncoderRef("t", 8), image_encoder=None, alignment=None)
    with pytest.raises(ModelArtifactError, match="no intent block"):
        load_artifact(tmp_path / "m")


def test_the_rerank_call_reads_photo_completed_values_from_a_products_v4_index(intent, text_encoder, tmp_path):
    """Serving builds the same columns from the index: the call fetches the photo fields and hands the model's intent
    block to the feature builder (an artifact of the old layout keeps its inputs)."""
    from indexing.engines import create_engine
    from indexing.engines.base import BulkAction
    from indexing.photo_attributes import Prediction, attribute_document_fields
    from mappings import load_mapping
    from rerank.model.artifact import EncoderRef, load_artifact, save_artifact
    from rerank.model.ranker import RankerConfig, build_ranker
    from rerank.reranker import Reranker

    engine = create_engine("local", path=tmp_path / "engine")
    engine.create_index("products", load_mapping("products-v4", text_dim=text_encoder.dim, image_dim=8))
    rows = [("a", "heels", "Red", None), ("b", "heels", "", Prediction("Black", 0.93)), ("c", "heels", "", None)]
    actions = []
    for (pid, title, colour, pred), vec in zip(rows, text_encoder.encode([r[1] for r in rows])):
        d = {F.ID: pid, F.TITLE: title, F.ARTICLE_TYPE: "Heels", F.COLOUR: colour, F.TEXT_VEC: vec.tolist()}
        d.update(attribute_document_fields(d, {"colour": pred} if pred else None, "photo-attributes:t" if pred else None))
        actions.append(BulkAction.index(pid, d))
    assert engine.bulk("products", actions).ok
    engine.refresh("products")

    def artifact(spec, out):
        cfg = RankerConfig(text_dim=text_encoder.dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                           hash_buckets=spec.hash_buckets, history_k=spec.history_k, d_model=16, hidden=32, heads=2, use_image=False)
        save_artifact(out, build_ranker(cfg, device="cpu", seed=0), feature_spec=spec, text_encoder=EncoderRef(text_encoder.model_id, text_encoder.dim),
                      image_encoder=None, intent=intent)
        return load_artifact(out, mapping=engine.get_mapping("products"), device="cpu")

    hits = [{"_id": "a", "_score": 3.0}, {"_id": "b", "_score": 2.0}, {"_id": "c", "_score": 1.0}]
    new = Reranker(engine, "products", artifact(FeatureSpec(attributes=("catalog", "photo")), tmp_path / "new"), text_encoder=text_encoder, budget_ms=10_000)
    req = new.request_features("black heels", hits)
    tail = req.first_stage[:, FeatureSpec().first_stage_dim:]
    by_id = dict(zip(req.ids, tail))
    assert by_id["b"][col(F.COLOUR, "photo_agreement")] == pytest.approx(1.0) and by_id["b"][col(F.COLOUR, "photo_confidence")] == pytest.approx(0.93)
    assert by_id["a"][col(F.COLOUR, "catalog_known")] == 1.0 and by_id["a"][col(F.COLOUR, "catalog_agreement")] < 0.5
    assert by_id["c"][[col(F.COLOUR, w) for w in ("catalog_known", "photo_confidence")]].tolist() == [0.0, 0.0]
    ranked = new.rerank("black heels", hits)
    assert ranked.degraded is None and {h.id for h in ranked.hits} == {"a", "b", "c"}
    old = Reranker(engine, "products", artifact(FeatureSpec(), tmp_path / "old"), text_encoder=text_encoder, budget_ms=10_000)
    assert old.request_features("black heels", hits).first_stage.shape == (3, FeatureSpec().first_stage_dim)
    engine.close()


def test_the_prediction_source_reads_the_photos_reading_where_indexing_did_not_complete(intent, text_encoder):
    q = text_encoder.encode(["black heels"])[0]
    unsure = {F.ARTICLE_TYPE: "Heels", F.COLOUR: "", F.COMPLETED_ATTRIBUTES: [], F.PHOTO_COLOUR: "Black", F.PHOTO_COLOUR_CONFIDENCE: 0.7}
    docs = [unsure, photo("Black", 0.93), {F.ARTICLE_TYPE: "Heels", F.COLOUR: "Red", F.PHOTO_COLOUR: "Black", F.PHOTO_COLOUR_CONFIDENCE: 0.99}]
    completed_only = match_features(intent, q, product_values(intent, docs, ("catalog", "photo")))
    with_predictions = match_features(intent, q, product_values(intent, docs, ("catalog", "photo", "prediction")))
    c = col(F.COLOUR, "photo_confidence")
    assert completed_only[:, c].tolist() == pytest.approx([0.0, 0.93, 0.0])
    assert with_predictions[:, c].tolist() == pytest.approx([0.7, 0.93, 0.0])  # the catalog's Red still wins over the photo
    assert with_predictions[0, col(F.COLOUR, "photo_agreement")] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="goes with 'photo'"):
        FeatureSpec(attributes=("catalog", "prediction"))
