"""Installing the demo's index for serving next to an index that is already there."""

from __future__ import annotations

import numpy as np
import pytest

from indexing import fields as F
from indexing.engines import BulkAction, create_engine
from indexing.errors import ConfigError
from indexing.lifecycle import load_body
from indexing.photo_colour import DIM
from workers.deploy import install_local_index, model_fits
from workers.settings import load_settings

ALIAS = "products"


def _engine(path, index, mapping, *, colour: bool, alias: str) -> None:
    eng = create_engine("local", path=path)
    try:
        eng.create_index(index, load_body(mapping, text_dim=4, image_dim=3))
        docs = []
        for i in range(3):
            d = {F.ID: f"p{i}", F.TITLE: f"shirt {i}", F.TEXT_VEC: [1.0, 0.0, 0.0, float(i)], F.IMAGE_VEC: [0.0, 1.0, float(i)],
                 F.HAS_IMAGE: True}
            if colour:
                d[F.IMAGE_COLOUR] = (np.eye(DIM)[i]).tolist()
            docs.append(BulkAction.index(d[F.ID], d))
        assert not eng.bulk(index, docs).failed
        eng.swap_alias(alias, index)
    finally:
        eng.close()


@pytest.fixture
def world(tmp_path):
    """An eval-cache engine with a products-v3 index and a model whose colour head reads image_colour."""
    from rerank.model.artifact import CONFIG_FILE
    import json

    src = tmp_path / "eval" / "engine"
    _engine(src, "eval-20261126t120000000", "products-v3", colour=True, alias="eval")
    model = tmp_path / "model"
    model.mkdir()
    (model / CONFIG_FILE).write_text(json.dumps({
        "format_version": 1, "kind": "fusion_ranker", "encoders": {"text": {"dim": 4, "model_id": "t"}},
        "colour": {"inputs": [[F.IMAGE_COLOUR, DIM], [F.IMAGE_VEC, 3]]}}))
    settings = load_settings(data_dir=str(tmp_path / "data"), engine="local", index_alias=ALIAS)
    return settings, src, model


def _alias(settings):
    eng = create_engine("local", path=settings.data_dir / "engine")
    try:
        return eng.get_alias(ALIAS), eng.list_indices("")
    finally:
        eng.close()


def test_an_earlier_demo_index_the_new_model_cannot_serve_is_replaced_and_kept(world):
    settings, src, model = world
    _engine(settings.data_dir / "engine", "eval-20261101t000000000", "products-v1", colour=False, alias=ALIAS)
    _, index, note = install_local_index(settings, src, "eval", fits=model_fits(model))
    assert index == "eval-20261126t120000000" and "image_colour" in note and "products-v3" in note
    now, indices = _alias(settings)
    assert now == [index] and set(indices) == {index, "eval-20261101t000000000"}  # the old one is kept
    eng = create_engine("local", path=settings.data_dir / "engine")
    try:
        assert len(eng.get(ALIAS, ["p2"])["p2"][F.IMAGE_COLOUR]) == DIM and eng.count(ALIAS) == 3
    finally:
        eng.close()
    # a second run: the model fits what is installed now, so nothing moves
    _, again, note = install_local_index(settings, src, "eval", fits=model_fits(model))
    assert again == index and "left as it is" in note


def test_the_users_own_index_is_never_replaced_and_the_error_says_why(world):
    settings, src, model = world
    _engine(settings.data_dir / "engine", "products-20261101t000000", "products-v1", colour=False, alias=ALIAS)
    with pytest.raises(ConfigError, match=r"points at 'products-20261101t000000'.*reads 'image_colour'"):
        install_local_index(settings, src, "eval", fits=model_fits(model))
    assert _alias(settings) == (["products-20261101t000000"], ["products-20261101t000000"])
    # without a check (or with a model that fits) it is left as it is, as before
    _, index, note = install_local_index(settings, src, "eval")
    assert index == "products-20261101t000000" and "left as it is" in note
