"""The synthetic catalog: fashion-preset CSV + drawn pictures, deterministic, readable by the real readers."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from indexing import fields as F
from indexing.catalog import Product, read_catalog, scan_catalog
from indexing.images import load_image
from indexing.synthetic import COLOURS, KINDS, make_synthetic_catalog


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_catalog(tmp_path_factory.mktemp("synth"), n=120, seed=7)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _truth(csv_path: Path) -> dict[str, dict[str, str]]:
    with open(csv_path.parent / "catalog_full.csv", newline="", encoding="utf-8") as f:
        return {r["product_id"]: r for r in csv.DictReader(f)}


def test_same_seed_same_bytes_other_seed_other_catalog(synth, tmp_path):
    again = make_synthetic_catalog(tmp_path / "a", n=120, seed=7)
    assert _files(again.parent) == _files(synth.parent)
    other = make_synthetic_catalog(tmp_path / "b", n=120, seed=8)
    assert other.read_bytes() != synth.read_bytes()


def test_reads_as_a_fashion_catalog_with_every_kind(synth):
    scan = scan_catalog(synth)
    assert scan.field_map.name == "fashion" and scan.rows == 120 and not scan.duplicate_rows
    items = list(read_catalog(synth, images_root=synth.parent))
    assert all(isinstance(p, Product) for p in items)
    assert {p.fields[F.ARTICLE_TYPE] for p in items} == {k.article_type for k in KINDS}
    with_img = [p for p in items if p.image]
    assert 0.75 * len(items) <= len(with_img) < len(items)  # most have a picture, some do not
    for p in with_img[:10]:
        img = load_image(p.image, synth.parent)
        assert img.size == (224, 224) and img.mode == "RGB"
        assert img.getpixel((2, 2)) == pytest.approx((255, 255, 255), abs=3)  # white background


def test_withheld_colours_are_only_in_the_picture(synth):
    truth = _truth(synth)
    items = list(read_catalog(synth, images_root=synth.parent))
    withheld = [p for p in items if F.COLOUR not in p.fields]
    assert 0.25 * len(items) <= len(withheld) <= 0.7 * len(items)
    for p in withheld:
        colour = truth[p.id]["base_colour"]
        assert p.image, "a withheld colour always has a picture to carry it"
        assert not re.search(rf"\b{colour}\b", p.fields[F.TITLE]) and re.search(rf"\b{colour}\b", truth[p.id]["title"])
    kept = [p for p in items if F.COLOUR in p.fields]
    assert all(p.fields[F.COLOUR] == truth[p.id]["base_colour"] and p.fields[F.COLOUR] in p.fields[F.TITLE] for p in kept)


def test_pictures_show_the_products_colour(synth):
    truth = _truth(synth)
    checked = 0
    for p in read_catalog(synth, images_root=synth.parent):
        if not p.image:
            continue
        img = np.asarray(load_image(p.image, synth.parent).quantize(colors=8).convert("RGB")).reshape(-1, 3)
        fg = img[img.astype(int).sum(axis=1) < 720]  # not the white background
        colours, counts = np.unique(fg, axis=0, return_counts=True)
        dominant = tuple(int(c) for c in colours[counts.argmax()])
        expected = COLOURS[truth[p.id]["base_colour"]]
        assert sum(abs(a - b) for a, b in zip(dominant, expected)) < 60, (p.id, dominant, expected)
        checked += 1
    assert checked > 80


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        make_synthetic_catalog("/tmp/never", n=0)
    with pytest.raises(ValueError, match="within"):
        make_synthetic_catalog("/tmp/never", n=5, withheld_colour_fraction=1.5)
