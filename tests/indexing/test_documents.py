"""Documents: product text, content hash, the document itself (checked against the mapping), skip logic."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexing import fields as F
from indexing.catalog import Product, read_catalog
from indexing.documents import build_document, content_hash, is_unchanged, product_text
from indexing.errors import DimensionError
from indexing.images import image_digest
from mappings import load_mapping

TEXT_DIM, IMAGE_DIM = 384, 1280


@pytest.fixture(scope="module")
def fashion(shared_data) -> Path:
    return shared_data / "fashion"


@pytest.fixture(scope="module")
def products(fashion) -> list[Product]:
    items = list(read_catalog(fashion / "bench" / "catalog.csv", images_root=fashion, stop=600))
    assert all(isinstance(p, Product) for p in items)
    return items


def _check_against_mapping(doc: dict[str, Any], props: dict[str, Any]) -> None:
    """The document fits the strict mapping: known keys only, values of the mapped types."""
    unknown = set(doc) - set(props)
    assert not unknown, f"keys not in the mapping (dynamic: strict would reject them): {unknown}"
    for key, value in doc.items():
        t = props[key]["type"]
        if t in ("keyword", "text"):
            assert isinstance(value, str) and value, key
        elif t == "float":
            assert isinstance(value, float) and np.isfinite(value), key
        elif t == "integer":
            assert isinstance(value, int) and not isinstance(value, bool), key
        elif t == "boolean":
            assert isinstance(value, bool), key
        elif t == "date":
            assert props[key]["format"] == "epoch_second" and isinstance(value, int), key
        elif t == "knn_vector":
            assert isinstance(value, list) and len(value) == props[key]["dimension"], key
            assert all(isinstance(x, float) for x in value), key
        else:  # pragma: no cover - a new mapping type needs a rule here
            pytest.fail(f"no check for mapping type {t!r} of {key!r}")


def test_product_text_holds_title_category_and_attributes(products):
    p = products[0]
    text = product_text(p)
    assert text.startswith(p.fields[F.TITLE])
    assert p.fields[F.CATEGORY] in text and p.fields[F.ATTRIBUTES] in text
    with_brand = dataclasses.replace(p, fields={**p.fields, F.BRAND: "Acme"})
    assert "Acme" in product_text(with_brand)
    named = dataclasses.replace(p, fields={**p.fields, F.BRAND: p.fields[F.TITLE].split()[0]})
    assert product_text(named) == text  # a brand the title already names is not repeated


def test_content_hash_is_stable_and_tracks_content(products, fashion):
    p = next(x for x in products if x.image)
    digest = image_digest(p.image, fashion)
    h = content_hash(p, digest)
    assert len(h) == 64 and h == content_hash(p, digest)
    # dict order and the row number (the file was re-sorted) do not matter
    shuffled = dataclasses.replace(p, row=p.row + 999, fields=dict(reversed(list(p.fields.items()))))
    assert content_hash(shuffled, digest) == h
    assert content_hash(dataclasses.replace(p, fields={**p.fields, F.TITLE: p.fields[F.TITLE] + " v2"}), digest) != h
    assert content_hash(p, "0" * 64) != h  # new photo bytes under the same path
    assert content_hash(p, None) != h
    assert content_hash(dataclasses.replace(p, image="images/other.jpg"), digest) != h


def test_document_without_image_is_a_missing_modality(products):
    p = next(x for x in products if not x.image)
    doc = build_document(
        p, text_vec=np.ones(TEXT_DIM, dtype=np.float32) / np.sqrt(TEXT_DIM), image_vec=None,
        text_model_id="minilm:abc:384", image_model_id=None, content_hash="h", indexed_at=1_700_000_000,
    )
    assert doc[F.HAS_IMAGE] is False
    assert F.IMAGE_VEC not in doc and F.IMAGE_MODEL_ID not in doc and F.IMAGE not in doc
    assert doc[F.ID] == p.id and doc[F.TITLE] == p.fields[F.TITLE]
    props = load_mapping("products-v1", text_dim=TEXT_DIM, image_dim=IMAGE_DIM)["mappings"]["properties"]
    _check_against_mapping(doc, props)


def test_build_document_refuses_inconsistent_input(products):
    p = products[0]
    ok = dict(text_vec=np.zeros(4) + 0.5, text_model_id="t", content_hash="h", indexed_at=1)
    with pytest.raises(ValueError, match="give both or neither"):
        build_document(p, image_vec=np.ones(3), image_model_id=None, **ok)
    with pytest.raises(ValueError, match="give both or neither"):
        build_document(p, image_vec=None, image_model_id="i", **ok)
    with pytest.raises(DimensionError, match="1-d"):
        build_document(p, **{**ok, "text_vec": np.ones((2, 3))}, image_vec=None, image_model_id=None)
    with pytest.raises(DimensionError, match="non-finite"):
        build_document(p, **{**ok, "text_vec": [0.1, float("nan")]}, image_vec=None, image_model_id=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        build_document(p, **{**ok, "indexed_at": datetime(2024, 1, 1)}, image_vec=None, image_model_id=None)
    doc = build_document(p, **{**ok, "indexed_at": datetime(2024, 1, 1, tzinfo=timezone.utc)}, image_vec=None, image_model_id=None)
    assert doc[F.INDEXED_AT] == 1_704_067_200


def test_is_unchanged():
    src = {F.CONTENT_HASH: "h1", F.TEXT_MODEL_ID: "t1", F.IMAGE_MODEL_ID: "i1"}
    assert is_unchanged(src, "h1", "t1", "i1")
    assert not is_unchanged(None, "h1", "t1", "i1")
    assert not is_unchanged({}, "h1", "t1", "i1")
    assert not is_unchanged(src, "h2", "t1", "i1")  # content changed
    assert not is_unchanged(src, "h1", "t2", "i1")  # new text model
    assert not is_unchanged(src, "h1", "t1", "i2")  # new image model
    assert not is_unchanged(src, "h1", "t1", None)  # the image went away
    no_img = {F.CONTENT_HASH: "h1", F.TEXT_MODEL_ID: "t1"}
    assert is_unchanged(no_img, "h1", "t1", None)
    assert not is_unchanged(no_img, "h1", "t1", "i1")  # an image appeared


@pytest.mark.slow
def test_real_documents_validate_against_the_mapping_and_rerun_is_unchanged(products, fashion):
    from indexing.encoders import get_image_encoder, get_text_encoder
    from indexing.images import load_image

    text = get_text_encoder(backend="onnx-int8")  # the fast backend: the document does not care which
    image = get_image_encoder(device="cpu")
    sample = [p for p in products if p.image][:12] + [p for p in products if not p.image][:4]
    props = load_mapping("products-v1", text_dim=text.dim, image_dim=image.dim)["mappings"]["properties"]
    tv = text.encode([product_text(p) for p in sample])
    with_img = [p for p in sample if p.image]
    iv = dict(zip((p.id for p in with_img), image.encode([load_image(p.image, fashion) for p in with_img])))
    docs = []
    for p, t in zip(sample, tv):
        digest = image_digest(p.image, fashion) if p.image else None
        h = content_hash(p, digest)
        doc = build_document(
            p, text_vec=t, image_vec=iv.get(p.id), text_model_id=text.model_id,
            image_model_id=image.model_id if p.id in iv else None, content_hash=h, indexed_at=1_700_000_000.7,
        )
        _check_against_mapping(doc, props)
        assert doc[F.HAS_IMAGE] is (p.image is not None) and doc[F.INDEXED_AT] == 1_700_000_000
        assert np.allclose(doc[F.TEXT_VEC], t) and abs(np.linalg.norm(doc[F.TEXT_VEC]) - 1) < 1e-5
        # the same product, same photo and same models on a re-run: skipped
        assert is_unchanged(doc, content_hash(p, digest), text.model_id, image.model_id if p.image else None)
        docs.append(doc)
    assert sum(1 for d in docs if F.IMAGE_VEC in d) == 12
