"""Model artifacts: round trip, versioning, and refusal of an index whose encoders disagree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexing.errors import ModelArtifactError
from mappings import load_mapping
from rerank.model.alignment import AlignmentConfig, train_alignment
from rerank.model.artifact import EncoderRef, load_artifact, read_config, save_artifact
from rerank.model.ranker import RankerConfig, build_ranker
from rerank.model.inputs import FeatureSpec
from tests.rerank.test_model import SPEC, TD, _request

TEXT = EncoderRef("minilm:53aa51172d14:32", TD)
IMAGE = EncoderRef("efficientnet_lite0:579344248a93:48", 48)


def _alignment():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(60, TD)).astype(np.float32)
    i = np.concatenate([t, t[:, :16]], axis=1) + 0.1 * rng.normal(size=(60, 48)).astype(np.float32)
    return train_alignment(t, i, [f"p{k}" for k in range(60)], AlignmentConfig(epochs=1, batch_size=16, holdout=0.2))


def _save(path, strategy="weighted"):
    cfg = RankerConfig(text_dim=TD, first_stage_dim=SPEC.first_stage_dim, n_cat_fields=len(SPEC.cat_fields), history_k=SPEC.history_k,
                       d_model=16, hidden=32, heads=2, strategy=strategy, use_history=False)
    model = build_ranker(cfg, device="cpu", seed=1).eval()
    al = _alignment()
    save_artifact(path, model, feature_spec=SPEC, text_encoder=TEXT, image_encoder=IMAGE, alignment=al, report={"best_validation_ndcg@10": 0.5})
    return model, al


def test_round_trip_gives_the_same_scores_and_projection(tmp_path):
    model, al = _save(tmp_path / "m1")
    art = load_artifact(tmp_path / "m1", mapping=load_mapping("products-v1", text_dim=TD, image_dim=48),
                        text_model_id=TEXT.model_id, image_model_id=IMAGE.model_id, device="cpu")
    r = _request(8)
    assert np.allclose(art.ranker.score(r).scores, model.score(r).scores, atol=1e-6)
    x = np.random.default_rng(1).normal(size=(3, 48)).astype(np.float32)
    assert np.allclose(art.alignment.project(x), al.project(x), atol=1e-6)
    assert art.feature_spec == SPEC and isinstance(art.feature_spec, FeatureSpec)
    assert art.ranker.config.strategy == "weighted" and art.ranker.config.use_history is False
    assert art.report == {"best_validation_ndcg@10": 0.5}
    cfg = read_config(tmp_path / "m1")
    assert cfg["encoders"] == {"text": TEXT.to_dict(), "image": IMAGE.to_dict()}
    assert cfg["format_version"] == 1 and cfg["artifact_version"] == art.version
    # saving again over an artifact replaces it with a new version
    _save(tmp_path / "m1", strategy="concat")
    assert load_artifact(tmp_path / "m1", device="cpu").ranker.config.strategy == "concat"


def test_mismatches_are_refused_naming_both_sides(tmp_path):
    _save(tmp_path / "m")
    with pytest.raises(ModelArtifactError, match=r"text_vec of dimension 32 .*mapping has text_vec dimension 384"):
        load_artifact(tmp_path / "m", mapping=load_mapping("products-v1", text_dim=384, image_dim=48), device="cpu")
    with pytest.raises(ModelArtifactError, match=r"image_vec of dimension 48 .*dimension 1280"):
        load_artifact(tmp_path / "m", mapping=load_mapping("products-v1", text_dim=TD, image_dim=1280), device="cpu")
    with pytest.raises(ModelArtifactError, match=r"minilm:53aa51172d14:32.*hf:other:32"):
        load_artifact(tmp_path / "m", text_model_id="hf:other:32", device="cpu")
    with pytest.raises(ModelArtifactError, match="efficientnet_lite0:579344248a93:48.*timm:resnet50"):
        load_artifact(tmp_path / "m", image_model_id="timm:resnet50:2048", device="cpu")


def test_broken_artifacts_are_refused(tmp_path):
    with pytest.raises(ModelArtifactError, match="no config.json"):
        load_artifact(tmp_path, device="cpu")
    _save(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelArtifactError, match="weights.safetensors"):
        load_artifact(tmp_path / "m", device="cpu")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ModelArtifactError, match="v99"):
        load_artifact(tmp_path / "m", device="cpu")
    other = tmp_path / "not-an-artifact"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    model = build_ranker(RankerConfig(text_dim=TD, d_model=16, hidden=32, heads=2), device="cpu")
    with pytest.raises(ModelArtifactError, match="not a model artifact"):
        save_artifact(other, model, feature_spec=SPEC, text_encoder=TEXT, image_encoder=None)


def test_the_colour_head_travels_in_the_artifact(tmp_path):
    from rerank.model.colour import ColourModel

    rng = np.random.default_rng(3)
    head = ColourModel(["Black", "Red", "Blue"], rng.normal(size=(3, TD)), rng.normal(size=(3, 48)), rng.normal(size=3), temperature=25.0,
                       report={"heldout_accuracy": 0.7})
    spec = FeatureSpec(colour=True)
    cfg = RankerConfig(text_dim=TD, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields), history_k=spec.history_k,
                       d_model=16, hidden=32, heads=2)
    save_artifact(tmp_path / "m", build_ranker(cfg, device="cpu", seed=1), feature_spec=spec, text_encoder=TEXT, image_encoder=IMAGE,
                  alignment=_alignment(), colour=head)
    art = load_artifact(tmp_path / "m", device="cpu")
    x = rng.normal(size=(4, 48)).astype(np.float32)
    assert art.colour.names == head.names and art.colour.temperature == 25.0 and art.colour.report == {"heldout_accuracy": 0.7}
    assert np.allclose(art.colour.photo_probs(x), head.photo_probs(x), atol=1e-6) and art.feature_spec.colour is True
    _save(tmp_path / "plain")
    assert load_artifact(tmp_path / "plain", device="cpu").colour is None  # an artifact without one


def test_an_artifact_of_another_feature_layout_is_refused_by_name(tmp_path):
    """A cached model trained when the colour inputs had another width must not reach a matmul shape error."""
    _save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["features"]["colour"] = True  # the spec now asks for more first-stage inputs than the ranker was built with
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelArtifactError, match="first-stage inputs.*retrain"):
        load_artifact(tmp_path / "m", device="cpu")
