"""Photo attributes: pixel colour features on drawn images, the heads trained on real catalog photos (held-out
accuracy above the majority class, only catalog values named), bad photos distrusted, the products-v4 fields
(completion never overwrites a catalog value) and the one function that says where a value came from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from indexing import fields as F
from indexing.errors import ConfigError, ModelArtifactError
from indexing.photo_attributes import (
    COLLAGE,
    NO_PRODUCT,
    AttributeConfig,
    AttributeModel,
    AttributeValue,
    Prediction,
    attribute_document_fields,
    attribute_value,
    load_cached,
    photo_quality,
    predict_images,
    train_attribute_model,
)
from indexing.photo_features import FG_SHARE_INDEX, PIXEL_DIM, object_count, pixel_features
from tests.indexing.photoslice import photo_catalog_slice, write_catalog


def _square(colour, size=224, box=(60, 40, 164, 184), bg=(255, 255, 255)) -> Image.Image:
    im = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(im).rectangle(box, fill=colour)
    return im


def _collage(tiles: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (224, 224), (255, 255, 255))
    for i, t in enumerate(tiles[:4]):
        out.paste(t.resize((100, 100)), (6 + (i % 2) * 116, 6 + (i // 2) * 116))
    return out


def _line_drawing() -> Image.Image:
    im = Image.new("RGB", (224, 224), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.line([(40, 150), (90, 60), (180, 70), (190, 160), (40, 150)], fill=(0, 0, 0), width=2)
    d.ellipse((100, 90, 140, 130), outline=(0, 0, 0), width=2)
    return im


def test_pixel_features_find_the_product_and_its_colour_in_lab():
    red = pixel_features(_square((200, 20, 30)))
    assert red.shape == (PIXEL_DIM,) and np.isfinite(red).all()
    share = 105 * 145 / 224**2
    assert abs(red[FG_SHARE_INDEX] - share) < 0.05
    w, L, a, b, chroma = red[:5]  # heaviest dominant colour: weight, L/100, a/64, b/64, chroma/64
    assert w > 0.9 and a > 0.8 and chroma > 0.8  # strongly red, saturated
    navy = pixel_features(_square((20, 30, 110)))
    assert navy[3] < -0.5 and navy[2] < red[2]  # b* strongly negative: blue
    white = pixel_features(Image.new("RGB", (224, 224), (250, 250, 250)))
    assert white[FG_SHARE_INDEX] == 1.0  # nothing separated: the whole-photo fallback
    assert photo_quality(white, familiarity=1.0, novelty_threshold=0.0) == NO_PRODUCT


def test_object_count_tells_a_product_a_pair_and_a_collage_apart():
    assert object_count(_square((0, 0, 0))) == 1
    pair = Image.new("RGB", (224, 224), (255, 255, 255))
    ImageDraw.Draw(pair).rectangle((20, 60, 100, 160), fill=(90, 50, 20))
    ImageDraw.Draw(pair).rectangle((124, 60, 204, 160), fill=(90, 50, 20))
    assert object_count(pair) == 2
    assert object_count(_collage([_square(c) for c in ((200, 0, 0), (0, 0, 200), (0, 150, 0), (20, 20, 20))])) == 4
    assert object_count(Image.new("RGB", (224, 224), (255, 255, 255))) == 0
    px = pixel_features(_square((0, 0, 0)))
    assert photo_quality(px, 1.0, 0.0, objects=4) == COLLAGE and photo_quality(px, 1.0, 0.0, objects=1) is None


def test_completion_fills_only_missing_values_at_high_confidence_and_never_overwrites():
    preds = {
        "colour": Prediction("Navy Blue", 0.93, (("Navy Blue", 0.93),)),
        "article_type": Prediction("Tshirts", 0.97, (("Tshirts", 0.97),)),
        "gender": Prediction("Women", 0.55, (("Women", 0.55),)),
        "usage": Prediction(None, 0.0, (("Casual", 0.9),)),  # distrusted photo: no value
    }
    catalog = {F.COLOUR: "", F.ARTICLE_TYPE: "Shirts", F.GENDER: None}
    out = attribute_document_fields(catalog, preds, "photo-attributes:abc", threshold=0.8)
    assert out[F.COMPLETED_ATTRIBUTES] == [F.COLOUR]  # type has a catalog value, gender is unsure, usage distrusted
    assert (out[F.EFFECTIVE_COLOUR], out[F.EFFECTIVE_ARTICLE_TYPE]) == ("Navy Blue", "Shirts")
    assert F.EFFECTIVE_GENDER not in out and F.EFFECTIVE_USAGE not in out
    assert out[F.PHOTO_COLOUR] == "Navy Blue" and out[F.PHOTO_COLOUR_CONFIDENCE] == 0.93
    assert out[F.PHOTO_ARTICLE_TYPE] == "Tshirts"  # the photo's opinion is stored beside the catalog's value
    assert F.PHOTO_USAGE not in out and out[F.PHOTO_USAGE_CONFIDENCE] == 0.0
    assert out[F.ATTRIBUTE_MODEL_ID] == "photo-attributes:abc"
    assert F.COLOUR not in out and F.ARTICLE_TYPE not in out  # the catalog fields themselves are never written
    doc = {**catalog, **out}
    assert attribute_value(doc, "colour") == AttributeValue("Navy Blue", "photo", 0.93)
    assert attribute_value(doc, F.ARTICLE_TYPE) == AttributeValue("Shirts", "catalog", 1.0)
    assert attribute_value(doc, "gender") == AttributeValue(None, None, 0.0)
    # no photo: catalog values only
    bare = attribute_document_fields({F.COLOUR: "Black"}, None, None)
    assert bare == {F.COMPLETED_ATTRIBUTES: [], F.EFFECTIVE_COLOUR: "Black"}
    with pytest.raises(ConfigError, match="unknown attribute 'size'"):
        attribute_value(doc, "size")
    with pytest.raises(ConfigError, match="threshold"):
        attribute_document_fields(catalog, preds, "m", threshold=0)


N_PHOTOS = 360


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """Heads trained on the first photographed products of the benchmark catalog (real photos, real encoder)."""
    from indexing.encoders import get_image_encoder
    from rerank.datasets.attribute_photos import load_labelled_photos

    d = tmp_path_factory.mktemp("attr")
    cat, rows = photo_catalog_slice(shared_data, d, N_PHOTOS)
    enc = get_image_encoder("efficientnet_lite0", device="cpu")
    data = load_labelled_photos(cat, d, enc, cache_dir=d / "cache")
    model = train_attribute_model(data, enc.model_id, AttributeConfig(holdout=0.25, min_count=3))
    return model, data, enc, d, rows


@pytest.mark.slow
def test_heads_beat_the_majority_class_on_held_out_photos_and_name_only_catalog_values(trained):
    model, data, _, _, rows = trained
    assert set(model.heads) == {"colour", "article_type", "gender", "usage"}
    r = model.report
    assert r["article_type"]["top1"] >= r["article_type"]["majority"] + 0.2
    assert r["colour"]["top1"] >= r["colour"]["majority"] + 0.1
    assert r["gender"]["top1"] > r["gender"]["majority"]
    for a in model.heads:
        assert 0 <= r[a]["top1"] <= r[a]["top3"] <= 1 and r[a]["n"] > 0
    # every class is a value the catalog used for that attribute (no invented colour name)
    used = {"colour": {x["base_colour"] for x in rows}, "article_type": {x["article_type"] for x in rows},
            "gender": {x["gender"] for x in rows}, "usage": {x["usage"] for x in rows}}
    for a, head in model.heads.items():
        assert set(head.classes) <= used[a] - {""}


@pytest.mark.slow
def test_the_model_round_trips_and_distrusts_bad_photos(trained, tmp_path):
    model, data, enc, d, rows = trained
    model.save(tmp_path / "m")
    loaded = AttributeModel.load(tmp_path / "m")
    # the colour head reads the region features (the maps pooled over the product, its Lab statistics); the others not
    assert loaded.heads["colour"].inputs == ("pixel", "image_vec", "regions") and loaded.needs_regions
    assert loaded.heads["article_type"].inputs == ("pixel", "image_vec") and loaded.regions == data.region_info
    a = model.predict(data.pixel[:20], data.image_vec[:20], regions=data.regions[:20])
    b = loaded.predict(data.pixel[:20], data.image_vec[:20], regions=data.regions[:20])
    assert [{k: v.value for k, v in x.items()} for x in a] == [{k: v.value for k, v in x.items()} for x in b]
    with pytest.raises(ModelArtifactError, match="region features"):
        loaded.predict(data.pixel[:2], data.image_vec[:2])
    with pytest.raises(ModelArtifactError, match="expects .* region features"):
        loaded.predict(data.pixel[:2], data.image_vec[:2], regions=data.regions[:2, :-1])
    # ordinary photos: one product on its backdrop (about 0.2% of catalog photos have no separable backdrop and are
    # distrusted too: they complete nothing)
    real = [im for im in (Image.open(d / r["image"]).convert("RGB") for r in rows[:12]) if object_count(im) == 1][:4]
    assert len(real) == 4
    bad = {
        "all background": Image.new("RGB", (224, 224), (255, 255, 255)),
        "line drawing": _line_drawing(),
        "collage": _collage(real),
    }
    ims = real[:2] + list(bad.values())
    preds = predict_images(loaded, ims, enc.encode(ims), encoder=enc)
    assert all(p["article_type"].value is not None for p in preds[:2])
    assert all(p["colour"].value in loaded.heads["colour"].classes for p in preds[:2])  # only catalog colour names
    for name, p in zip(bad, preds[2:]):
        assert all(x.value is None and x.confidence == 0.0 for x in p.values()), name
    # the model must match the image model whose vectors it reads
    with pytest.raises(ModelArtifactError, match="trained on .* vectors"):
        load_cached(tmp_path / "m", "other_model:abc:1280")
    with pytest.raises(ModelArtifactError, match="missing"):
        load_cached(tmp_path / "nothing", enc.model_id)


@pytest.mark.slow
def test_indexing_into_products_v4_stores_predictions_and_completes_only_missing_values(trained, tmp_path):
    from indexing.pipeline import IndexJob
    from workers.composition import build_engine
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    model, _, enc, d, rows = trained
    model.save(tmp_path / "m")
    sub = rows[:40]
    cat = write_catalog(tmp_path / "catalog.csv", sub)
    settings = load_settings(data_dir=tmp_path / "data", mapping="products-v4")
    engine = build_engine(settings)
    job = IndexJob(catalog=str(cat), index="products", images_root=str(d), device="cpu", batch_size=16,
                   attribute_model=str(tmp_path / "m"), attribute_threshold=0.6)
    s = run_index_job(engine, settings, job, progress=False)
    assert (s.indexed, s.failed) == (40, 0)
    docs = {x[F.ID]: x for x in engine.iter_documents("products")}
    completed = 0
    for r in sub:
        doc = docs[r["product_id"]]
        assert doc.get(F.COLOUR, "") == r["base_colour"] or (not r["base_colour"] and not doc.get(F.COLOUR))  # never overwritten
        assert doc[F.ATTRIBUTE_MODEL_ID].startswith("photo-attributes:") and 0 <= doc[F.PHOTO_ARTICLE_TYPE_CONFIDENCE] <= 1
        for field_name in doc[F.COMPLETED_ATTRIBUTES]:
            assert not r.get("base_colour" if field_name == F.COLOUR else field_name)
            v = attribute_value(doc, field_name)
            assert v.source == "photo" and v.confidence >= 0.6
            assert doc[F.EFFECTIVE_FIELDS[field_name]] == v.value
            completed += 1
        if r["base_colour"]:
            assert attribute_value(doc, "colour") == AttributeValue(r["base_colour"], "catalog", 1.0)
    assert completed > 0, "some colourless products are completed from their photo"
    # filters: a colour filter finds photo-completed products only when asked to
    from indexing.engines.base import Filters

    doc = next(x for x in docs.values() if F.COLOUR in x[F.COMPLETED_ATTRIBUTES])
    colour = doc[F.PHOTO_COLOUR]
    qv = np.asarray(doc[F.TEXT_VEC], dtype=np.float32)
    plain = {h.id for h in engine.knn_search("products", F.TEXT_VEC, qv, k=40, filters=Filters(terms={F.COLOUR: colour}))}
    both = {h.id for h in engine.knn_search("products", F.TEXT_VEC, qv, k=40,
                                             filters=Filters(terms={F.COLOUR: colour}, include_completed=True))}
    assert doc[F.ID] in both and doc[F.ID] not in plain and plain < both
    want = {i for i, x in docs.items() if attribute_value(x, "colour").value == colour}
    assert both == want and plain == {i for i, x in docs.items() if x.get(F.COLOUR) == colour}
    hits = engine.bm25_search("products", "shirt shoes watch bag", size=40, filters=Filters(terms={F.COLOUR: colour}, include_completed=True))
    assert {h.id for h in hits} <= want
    # a re-run with the same model rewrites nothing
    again = run_index_job(engine, settings, job, progress=False)
    assert (again.indexed, again.unchanged) == (0, 40)
    engine.close()


@pytest.mark.slow
def test_reindex_into_products_v4_predicts_once_and_copies_predictions_without_rereading(trained, tmp_path):
    from indexing.engines import create_engine
    from indexing.pipeline import IndexJob
    from rerank.history.store import upgrade
    from workers.jobs import run_index_job
    from workers.reindex_jobs import ReindexJobStore, make_plan, start_job
    from workers.settings import load_settings

    model, _, enc, d, rows = trained
    model.save(tmp_path / "m")
    photos = tmp_path / "photos"
    shutil.copytree(d / "images", photos / "images")
    sub = rows[:24]
    cat = write_catalog(tmp_path / "catalog.csv", sub)
    s = load_settings(data_dir=str(tmp_path / "data"), engine="local", device="cpu")  # default mapping: products-v3
    upgrade(s.effective_sql_url)
    eng = create_engine("local", path=tmp_path / "data" / "engine")
    store = ReindexJobStore(s.effective_sql_url)
    try:
        run_index_job(eng, s, IndexJob(catalog=str(cat), index="products", images_root=str(photos), device="cpu"), progress=False)

        def reindex():
            plan = make_plan(eng, alias="products", mapping="products-v4", text_model="minilm", text_backend="torch",
                             image_model="efficientnet_lite0", images_root=str(photos), device="cpu", batch_size=10,
                             attribute_model=str(tmp_path / "m"), attribute_threshold=0.6)
            return start_job(eng, store, plan, progress=False).to_dict()

        out = reindex()
        eng.refresh("products")
        docs = {x[F.ID]: x for x in eng.iter_documents("products")}
        assert len(docs) == 24 and all(x[F.ATTRIBUTE_MODEL_ID].startswith("photo-attributes:") for x in docs.values())
        for r in sub:
            doc = docs[r["product_id"]]
            assert doc.get(F.COLOUR, "") == r["base_colour"]
            if r["base_colour"]:
                assert doc[F.EFFECTIVE_COLOUR] == r["base_colour"]
        before = {i: (x.get(F.PHOTO_COLOUR), x[F.COMPLETED_ATTRIBUTES]) for i, x in docs.items()}
        # a second reindex with the same model copies the predictions: with the photos gone, nothing fails or changes
        shutil.rmtree(photos)
        out2 = reindex()
        assert "attributes skipped" not in str(out2) and "attributes skipped" not in str(out)
        eng.refresh("products")
        after = {x[F.ID]: (x.get(F.PHOTO_COLOUR), x[F.COMPLETED_ATTRIBUTES]) for x in eng.iter_documents("products")}
        assert after == before
    finally:
        store.close()
        eng.close()


@pytest.mark.slow
def test_eval_attributes_prints_each_heads_held_out_accuracy_as_json(trained, monkeypatch):
    import json

    from typer.testing import CliRunner

    from workers.cli import app

    _, _, _, d, _ = trained
    monkeypatch.setenv("FUSIONRANK_DATA_DIR", str(d / "cache"))  # the fixture's feature cache
    monkeypatch.setenv("FUSIONRANK_DEVICE", "cpu")
    r = CliRunner().invoke(app, ["eval", "--attributes", "--catalog", str(d / "catalog.csv"), "--images-root", str(d), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["attributes"]) == {"colour", "article_type", "gender", "usage"}
    for a, v in out["attributes"].items():
        assert set(v) == {"top1", "top3", "majority", "n"} and 0 <= v["majority"] <= 1 and v["n"] > 0
    assert out["attributes"]["article_type"]["top1"] > out["attributes"]["article_type"]["majority"]
    # --no-regions: the version-1 recipe (the colour head without region features); the other heads are the same
    r = CliRunner().invoke(app, ["eval", "--attributes", "--catalog", str(d / "catalog.csv"), "--images-root", str(d), "--json", "--no-regions"])
    assert r.exit_code == 0, r.output
    plain = json.loads(r.stdout.strip().splitlines()[-1])["attributes"]
    assert plain["article_type"] == out["attributes"]["article_type"] and plain["colour"]["n"] == out["attributes"]["colour"]["n"]
    # --no-finetune: the version-2 recipe (no fine-tuned colour branch); the other heads are the same
    r = CliRunner().invoke(app, ["eval", "--attributes", "--catalog", str(d / "catalog.csv"), "--images-root", str(d), "--json", "--no-finetune"])
    assert r.exit_code == 0, r.output
    v2 = json.loads(r.stdout.strip().splitlines()[-1])["attributes"]
    assert v2["article_type"] == out["attributes"]["article_type"] and v2["colour"]["n"] == out["attributes"]["colour"]["n"]
    r = CliRunner().invoke(app, ["eval", "--catalog", str(d / "catalog.csv")])
    assert r.exit_code != 0 and "--queries, --qrels, --gain required" in r.output


@pytest.mark.slow
def test_version_1_models_still_load_and_predict_and_unknown_versions_name_the_command(trained, tmp_path):
    import json

    from indexing.photo_attributes import CONFIG_FILE

    _, data, _, _, _ = trained
    old = train_attribute_model(data, "m", AttributeConfig(holdout=0.25, min_count=3, region_heads=()))
    assert not old.needs_regions and all(h.inputs == ("pixel", "image_vec") for h in old.heads.values())
    old.save(tmp_path / "v1")
    config = json.loads((tmp_path / "v1" / CONFIG_FILE).read_text())
    config["version"] = 1  # what the first release wrote: no inputs, no regions
    del config["regions"]
    for h in config["heads"].values():
        del h["inputs"]
    (tmp_path / "v1" / CONFIG_FILE).write_text(json.dumps(config))
    loaded = AttributeModel.load(tmp_path / "v1")
    assert not loaded.needs_regions
    a = old.predict(data.pixel[:30], data.image_vec[:30])
    b = loaded.predict(data.pixel[:30], data.image_vec[:30])
    assert [{k: v.value for k, v in x.items()} for x in a] == [{k: v.value for k, v in x.items()} for x in b]
    config["version"] = 99
    (tmp_path / "v1" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelArtifactError, match="version 99.*fusionrank attributes train"):
        AttributeModel.load(tmp_path / "v1")
    config["version"], config["regions"] = 2, {"recipe": "regions-v0", "blocks": [2], "dim": 3}
    (tmp_path / "v1" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelArtifactError, match="recipe 'regions-v0'.*fusionrank attributes train"):
        AttributeModel.load(tmp_path / "v1")
