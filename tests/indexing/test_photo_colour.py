"""The photo colour descriptor: where the mass goes for drawn photos, and on the benchmark's real photos."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from indexing.photo_colour import BINS, DIM, colour_descriptor


def _cell(rgb: tuple[int, int, int]) -> int:
    q = [min(int(v / 255.0 * BINS), BINS - 1) for v in rgb]
    return (q[0] * BINS + q[1]) * BINS + q[2]


def _product(colour, background=(255, 255, 255), size=224, mode="RGB"):
    im = Image.new(mode, (size, size), background)
    im.paste(Image.new(mode, (size // 2, size * 2 // 3), colour), (size // 4, size // 6))
    return im


def test_a_red_product_on_a_white_backdrop_is_red_and_the_backdrop_does_not_count():
    d = colour_descriptor(_product((200, 20, 30)))
    assert d.shape == (DIM,) and d.dtype == np.float32
    assert abs(float(np.linalg.norm(d)) - 1.0) < 1e-5  # sqrt of a normalized histogram
    h = d**2
    assert h[_cell((200, 20, 30))] > 0.85  # the rest: edge pixels blended with the backdrop by the downscale
    assert h[_cell((255, 255, 255))] < 0.01


def test_the_backdrop_is_found_from_the_border_whatever_its_colour():
    on_grey = colour_descriptor(_product((20, 40, 200), background=(180, 180, 180)))
    assert (on_grey**2)[_cell((20, 40, 200))] > 0.85


def test_two_coloured_product_splits_its_mass_and_similar_colours_score_higher():
    im = _product((200, 20, 30))
    im.paste(Image.new("RGB", (112, 75), (20, 40, 200)), (56, 112))
    h = colour_descriptor(im) ** 2
    assert h[_cell((200, 20, 30))] > 0.2 and h[_cell((20, 40, 200))] > 0.2
    red, dark_red, blue = (colour_descriptor(_product(c)) for c in ((200, 20, 30), (190, 30, 40), (20, 40, 200)))
    assert float(red @ dark_red) > 0.9 > 0.1 > float(red @ blue)  # inner product = Bhattacharyya coefficient


def test_a_white_product_on_white_falls_back_to_the_whole_photo():
    h = colour_descriptor(Image.new("RGB", (100, 80), (250, 250, 250))) ** 2
    assert h[_cell((250, 250, 250))] == pytest.approx(1.0)


def test_modes_other_than_rgb_are_read_and_transparency_counts_as_white():
    grey = colour_descriptor(_product(40, background=255, mode="L"))
    assert (grey**2)[_cell((40, 40, 40))] > 0.85
    rgba = Image.new("RGBA", (120, 120), (0, 0, 0, 0))  # transparent black backdrop reads as white
    rgba.paste(Image.new("RGBA", (60, 80), (30, 160, 40, 255)), (30, 20))
    h = colour_descriptor(rgba) ** 2
    assert h[_cell((30, 160, 40))] > 0.85 and h[_cell((0, 0, 0))] < 0.01
    with pytest.raises(TypeError, match="PIL.Image"):
        colour_descriptor(np.zeros((4, 4, 3)))


def test_real_photos_labelled_black_and_white_put_their_mass_at_the_two_ends(shared_data):
    """On the benchmark's real photos: products whose (full) catalog colour is Black hold most of their foreground in
    the darkest cells, White ones in the lightest; a descriptor's own colour is closer to its label's mean than the other's."""
    rows = {"Black": [], "White": []}
    with (shared_data / "fashion" / "products.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            if r["image"] and r["base_colour"] in rows and len(rows[r["base_colour"]]) < 40:
                rows[r["base_colour"]].append(r)
            if all(len(v) >= 40 for v in rows.values()):
                break
    dark = [c for c in range(DIM) if max(c // (BINS * BINS), (c // BINS) % BINS, c % BINS) <= 1]
    light = [c for c in range(DIM) if min(c // (BINS * BINS), (c // BINS) % BINS, c % BINS) >= BINS - 2]
    desc = {k: np.stack([colour_descriptor(Image.open(shared_data / "fashion" / r["image"])) for r in v]) for k, v in rows.items()}
    dark_mass = {k: float((d[:, dark] ** 2).sum(axis=1).mean()) for k, d in desc.items()}
    light_mass = {k: float((d[:, light] ** 2).sum(axis=1).mean()) for k, d in desc.items()}
    assert dark_mass["Black"] > 0.5 > 0.2 > dark_mass["White"], dark_mass
    assert light_mass["White"] > 0.35 > 0.2 > light_mass["Black"], light_mass
    means = {k: d.mean(axis=0) for k, d in desc.items()}
    right = sum(int(((d @ means[k]) > (d @ means[o])).sum()) for k, d in desc.items() for o in desc if o != k)
    assert right / 80 > 0.85, right
