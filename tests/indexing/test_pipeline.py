"""The inline indexing job on real catalog rows, real photos and real models: bad rows become error
records, products without a photo keep their text, re-runs skip unchanged products."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indexing import fields as F
from indexing.pipeline import IndexJob, plan_batches
from workers.cli import app
from workers.composition import build_engine
from workers.jobs import run_index_job
from workers.settings import load_settings

pytestmark = pytest.mark.slow
N_GOOD = 40


@pytest.fixture(scope="module")
def catalog(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """40 real rows of the benchmark catalog (with and without photos) plus one row of every bad kind."""
    d = tmp_path_factory.mktemp("catalog")
    (d / "images").mkdir()
    src = shared_data / "fashion" / "bench" / "catalog.csv"
    with src.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        with_img, without = [], []
        for r in reader:
            (with_img if r["image"] else without).append(r)
            if len(with_img) >= 25 and len(without) >= N_GOOD - 25:
                break
        rows = with_img[:25] + without[: N_GOOD - 25]
    for r in rows:
        if r["image"]:
            shutil.copy(shared_data / "fashion" / r["image"], d / r["image"])
    (d / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = [
        dict(rows[0], product_id="", title="no id here"),
        dict(rows[1]),  # duplicate id of row 1
        dict(rows[2], product_id="900001", image="images/broken.jpg"),
        dict(rows[3], product_id="900002", image="../../../etc/passwd"),
        dict(rows[4], product_id="900003", image="images/missing.jpg"),
    ]
    path = d / "catalog.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows + bad)
    return path, d


def _job(catalog: Path, root: Path, **kw) -> IndexJob:
    return IndexJob(catalog=str(catalog), index="products", images_root=str(root), batch_size=16, device="cpu", **kw)


def test_plan_batches_covers_every_row_once():
    assert plan_batches(35, 16) == [(0, 16), (16, 32), (32, 35)]
    assert plan_batches(0, 16) == []
    with pytest.raises(ValueError):
        plan_batches(10, 0)


def test_inline_job_records_bad_rows_and_indexes_the_rest(catalog):
    path, root = catalog
    settings = load_settings()
    engine = build_engine(settings)
    s = run_index_job(engine, settings, _job(path, root), progress=False)
    assert s.rows == N_GOOD + 5
    assert (s.indexed, s.unchanged, s.failed) == (N_GOOD, 0, 5)
    by_row = {e.row: e.reason for e in s.errors}
    assert set(by_row) == {N_GOOD, N_GOOD + 1, N_GOOD + 2, N_GOOD + 3, N_GOOD + 4}
    assert "id" in by_row[N_GOOD]
    assert "duplicate" in by_row[N_GOOD + 1]
    assert "image" in by_row[N_GOOD + 2]
    assert "outside the images root" in by_row[N_GOOD + 3]
    assert "not found" in by_row[N_GOOD + 4]
    assert engine.count("products") == N_GOOD
    # the alias points at a generation created from the mapping with the encoders' dimensions
    (gen,) = engine.get_alias("products")
    assert gen.startswith("products-") and s.index == gen

    docs = {d[F.ID]: d for d in engine.iter_documents("products")}
    with_photo = [d for d in docs.values() if d[F.HAS_IMAGE]]
    without = [d for d in docs.values() if not d[F.HAS_IMAGE]]
    assert with_photo and without, "the slice has products with and without photos"
    for d in without:  # missing modality: indexed without image_vec, not dropped
        assert F.IMAGE_VEC not in d or d[F.IMAGE_VEC] is None
        assert len(d[F.TEXT_VEC]) == 384
    for d in with_photo:
        v = np.asarray(d[F.IMAGE_VEC], dtype=np.float32)
        assert v.shape == (1280,) and abs(float(np.linalg.norm(v)) - 1) < 1e-3
        assert d[F.IMAGE_MODEL_ID].startswith("efficientnet_lite0:")
    # the default mapping (products-v3) stores each photo's pixel colour descriptor, computed from the same decoded photo
    from indexing.images import decode_image, fetch_image_bytes
    from indexing.photo_colour import DIM, colour_descriptor

    for d in with_photo:
        c = np.asarray(d[F.IMAGE_COLOUR], dtype=np.float32)
        assert c.shape == (DIM,) and abs(float(np.linalg.norm(c)) - 1) < 1e-4
    first = with_photo[0]
    want = colour_descriptor(decode_image(fetch_image_bytes(first[F.IMAGE], root), source="test"))
    np.testing.assert_allclose(np.asarray(first[F.IMAGE_COLOUR], dtype=np.float32), want, atol=1e-6)
    assert all(d.get(F.IMAGE_COLOUR) is None for d in without)

    # a re-run encodes nothing: every product's hash and model ids are unchanged
    again = run_index_job(engine, settings, _job(path, root), progress=False)
    assert (again.indexed, again.unchanged, again.failed) == (0, N_GOOD, 5)


def test_a_changed_product_is_the_only_one_re_encoded(catalog, tmp_path):
    path, root = catalog
    settings = load_settings()
    engine = build_engine(settings)
    run_index_job(engine, settings, _job(path, root), progress=False)
    rows = list(csv.DictReader(path.open(newline="")))
    rows[5]["title"] = rows[5]["title"] + " Limited Edition"
    changed = tmp_path / "catalog.csv"
    with changed.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    before = engine.get("products", [rows[5]["product_id"]])[rows[5]["product_id"]]
    s = run_index_job(engine, settings, _job(changed, root), progress=False)
    assert (s.indexed, s.unchanged) == (1, N_GOOD - 1)
    after = engine.get("products", [rows[5]["product_id"]])[rows[5]["product_id"]]
    assert after[F.TITLE].endswith("Limited Edition") and after[F.CONTENT_HASH] != before[F.CONTENT_HASH]


def test_index_command_prints_one_json_summary(catalog):
    path, root = catalog
    res = CliRunner().invoke(app, ["index", "--catalog", str(path), "--images-root", str(root), "--limit", "20", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["rows"] == 20 and out["indexed"] == 20 and out["failed"] == 0 and out["via"] == "inline"
    assert set(out) >= {"index", "indexed", "unchanged", "failed", "failure_reasons", "errors", "seconds", "docs_per_s"}


def test_index_into_an_index_built_for_other_dimensions_is_refused(catalog):
    from indexing.errors import MappingError
    from indexing.lifecycle import load_body

    path, root = catalog
    settings = load_settings()
    engine = build_engine(settings)
    engine.create_index("products-old", load_body("products-v1", text_dim=768, image_dim=1280))
    engine.swap_alias("products", "products-old")
    with pytest.raises(MappingError, match="text_vec with dimension 768.*produces 384"):
        run_index_job(engine, settings, _job(path, root), progress=False)


def test_an_index_from_an_older_mapping_gets_no_colour_descriptor(catalog):
    # products-v1 is dynamic: strict without image_colour; indexing into it must not send the field (it would be rejected)
    path, root = catalog
    settings = load_settings(mapping="products-v1")
    engine = build_engine(settings)
    s = run_index_job(engine, settings, _job(path, root), progress=False)
    assert (s.indexed, s.failed) == (N_GOOD, 5)
    docs = list(engine.iter_documents("products"))
    assert any(d[F.HAS_IMAGE] for d in docs) and all(F.IMAGE_COLOUR not in d for d in docs)


def test_missing_catalog_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["index", "--catalog", str(tmp_path / "nope.csv")])
    assert res.exit_code != 0
    assert "catalog file not found" in str(res.exception)
