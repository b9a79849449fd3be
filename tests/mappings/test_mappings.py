import json
from importlib import resources

import pytest

import mappings
from indexing import fields as F
from indexing.errors import MappingError
from indexing.lifecycle import check_dims, load_body


def test_products_v1_is_listed_and_fills_dimensions():
    assert "products-v1" in mappings.available()
    body = mappings.load_mapping("products-v1", text_dim=384, image_dim=1280)
    assert body["settings"]["index"]["knn"] is True
    props = body["mappings"]["properties"]
    assert props[F.TEXT_VEC]["dimension"] == 384
    assert props[F.IMAGE_VEC]["dimension"] == 1280
    for f in (F.TEXT_VEC, F.IMAGE_VEC):
        m = props[f]["method"]
        assert m["name"] == "hnsw" and m["engine"] == "faiss"
        assert set(m["parameters"]) == {"m", "ef_construction"}
    assert mappings.vector_dims(body) == {F.TEXT_VEC: 384, F.IMAGE_VEC: 1280}
    assert "_comment" not in body


def test_products_v3_is_the_default_and_is_v1_plus_the_photo_colour_descriptor():
    from indexing.lifecycle import stores_image_colour
    from indexing.photo_colour import DIM

    assert mappings.DEFAULT_MAPPING == "products-v3"
    v1 = mappings.load_mapping("products-v1", text_dim=384, image_dim=1280)
    v3 = mappings.load_mapping(text_dim=384, image_dim=1280)
    p1, p3 = v1["mappings"]["properties"], v3["mappings"]["properties"]
    assert set(p3) - set(p1) == {F.IMAGE_COLOUR}
    assert all(p3[f] == p1[f] for f in p1)  # the same fields and HNSW parameters as v1
    assert v3["settings"] == v1["settings"] and v3["mappings"]["dynamic"] == "strict"
    assert mappings.vector_dims(v3) == {F.TEXT_VEC: 384, F.IMAGE_VEC: 1280, F.IMAGE_COLOUR: DIM}  # a fixed dimension, no placeholder
    assert p3[F.IMAGE_COLOUR]["method"]["space_type"] == "innerproduct"  # unit-norm descriptors: Bhattacharyya coefficient
    assert stores_image_colour(v3) and not stores_image_colour(v1)
    assert not stores_image_colour(mappings.load_mapping("products-v2", text_dim=8, image_dim=8))
    wrong = mappings.load_mapping(text_dim=8, image_dim=8)
    wrong["mappings"]["properties"][F.IMAGE_COLOUR]["dimension"] = 64
    with pytest.raises(MappingError, match=rf"image_colour.*dimension 64.*dimension {DIM}"):
        stores_image_colour(wrong, "index 'x'")


def test_mapping_fields_match_the_field_names_code_uses():
    # the newest mapping (products-v4) has every field code names; the default (v3) all but the photo attributes
    props = mappings.load_mapping("products-v4", text_dim=8, image_dim=8)["mappings"]["properties"]
    names = {v for k, v in vars(F).items() if k.isupper() and isinstance(v, str)}
    assert names == set(props), f"fields.py and products-v4.json disagree: {names ^ set(props)}"
    v3 = mappings.load_mapping(text_dim=8, image_dim=8)["mappings"]["properties"]
    assert set(v3) < set(props) and {f for f in set(props) - set(v3)} == {
        F.PHOTO_COLOUR, F.PHOTO_COLOUR_CONFIDENCE, F.PHOTO_ARTICLE_TYPE, F.PHOTO_ARTICLE_TYPE_CONFIDENCE, F.PHOTO_GENDER,
        F.PHOTO_GENDER_CONFIDENCE, F.PHOTO_USAGE, F.PHOTO_USAGE_CONFIDENCE, F.COMPLETED_ATTRIBUTES, F.ATTRIBUTE_MODEL_ID,
        *F.EFFECTIVE_FIELDS.values()}
    assert all(v3[f] == props[f] for f in v3)
    for f in F.BM25_FIELDS:
        assert props[f]["type"] == "text" and props[f]["analyzer"] == "english"
    for f in F.KEYWORD_FIELDS:
        assert props[f]["type"] == "keyword"
    for f in F.NUMERIC_FIELDS:
        assert props[f]["type"] in {"float", "integer", "long", "double"}


def test_title_brand_category_have_keyword_subfields():
    props = mappings.load_mapping("products-v1", text_dim=8, image_dim=8)["mappings"]["properties"]
    for f in (F.TITLE, F.BRAND, F.CATEGORY):
        assert props[f]["fields"]["raw"]["type"] == "keyword"


def test_lucene_engine_switch_keeps_a_valid_space_type():
    body = mappings.load_mapping("products-v1", text_dim=4, image_dim=4, hnsw_engine="lucene")
    m = body["mappings"]["properties"][F.TEXT_VEC]["method"]
    assert m["engine"] == "lucene" and m["space_type"] in mappings.SPACE_TYPES["lucene"]


def test_loading_does_not_mutate_the_cached_file():
    a = mappings.load_mapping("products-v1", text_dim=4, image_dim=4)
    a["mappings"]["properties"][F.TEXT_VEC]["dimension"] = 999
    b = mappings.load_mapping("products-v1", text_dim=4, image_dim=4)
    assert b["mappings"]["properties"][F.TEXT_VEC]["dimension"] == 4
    raw = json.loads((resources.files("mappings") / "products-v1.json").read_text())
    assert raw["mappings"]["properties"][F.TEXT_VEC]["dimension"] == "${text_dim}"


@pytest.mark.parametrize("bad", [0, -3, 3.5, "384", True, None])
def test_bad_dimensions_are_refused(bad):
    with pytest.raises(mappings.MappingFileError, match="positive integer"):
        mappings.load_mapping("products-v1", text_dim=bad, image_dim=8)


def test_unknown_mapping_names_the_available_ones():
    with pytest.raises(MappingError, match="products-v1"):
        load_body("products-v9", text_dim=4, image_dim=4)


def test_dimension_mismatch_with_the_encoder_names_the_cause():
    body = mappings.load_mapping("products-v1", text_dim=384, image_dim=1280)
    check_dims("products-x", body, text_dim=384, image_dim=1280)
    with pytest.raises(MappingError, match=r"text_vec with dimension 384.*produces 768"):
        check_dims("products-x", body, text_dim=768, image_dim=1280)
    # the shape OpenSearch's GET /<index>/_mapping returns is understood too
    with pytest.raises(MappingError, match=r"image_vec with dimension 1280.*produces 512"):
        check_dims("products-x", {"products-x": {"mappings": body["mappings"]}}, text_dim=384, image_dim=512)
