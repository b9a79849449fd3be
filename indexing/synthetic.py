"""A synthetic fashion catalog with drawn product pictures, for machines without ``../shared/data``.

:func:`make_synthetic_catalog` writes, under ``out_dir``:

- ``catalog.csv`` in the ``fashion`` preset's format (``product_id,title,gender,master_category,
  sub_category,article_type,base_colour,season,year,usage,image``), image paths relative to ``out_dir``
  (so ``images_root = out_dir``);
- ``images/<product_id>.jpg``: a 224x224 JPEG on white showing a simple silhouette of the product's
  kind (t-shirt, trousers, dress, shoe, heel, bag, backpack, watch, cap) in the product's colour;
- ``catalog_full.csv``: the same rows before any colour was withheld (the ground truth).

Like the real benchmark, a fraction of products has the colour withheld from the text (colour word
removed from the title, ``base_colour`` left empty) while the picture still shows it, and a fraction
has no picture. The output is a pure function of ``(n, seed)`` and the fractions: byte-identical on
every run.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = ("product_id", "title", "gender", "master_category", "sub_category", "article_type", "base_colour", "season", "year", "usage", "image")

#: colour name -> RGB drawn in the picture
COLOURS: dict[str, tuple[int, int, int]] = {
    "Black": (25, 25, 25),
    "White": (236, 236, 230),
    "Grey": (128, 128, 128),
    "Navy Blue": (20, 34, 90),
    "Blue": (35, 90, 200),
    "Red": (200, 30, 35),
    "Green": (30, 140, 60),
    "Yellow": (240, 200, 30),
    "Pink": (240, 130, 175),
    "Purple": (110, 45, 140),
    "Brown": (110, 70, 35),
    "Orange": (240, 120, 25),
}


@dataclass(frozen=True)
class _Kind:
    article_type: str
    master: str
    sub: str
    shape: str
    genders: tuple[str, ...]
    usages: tuple[str, ...]
    nouns: tuple[str, ...]
    styles: tuple[str, ...]


KINDS: tuple[_Kind, ...] = (
    _Kind("Tshirts", "Apparel", "Topwear", "top", ("Men", "Women", "Unisex"), ("Casual", "Sports"), ("T-shirt", "Tshirt"), ("Solid", "Printed", "Striped", "Polo")),
    _Kind("Shirts", "Apparel", "Topwear", "shirt", ("Men", "Women"), ("Casual", "Formal"), ("Shirt",), ("Slim Fit", "Checked", "Solid", "Formal")),
    _Kind("Jeans", "Apparel", "Bottomwear", "trousers", ("Men", "Women"), ("Casual",), ("Jeans",), ("Slim Fit", "Skinny", "Regular Fit")),
    _Kind("Trousers", "Apparel", "Bottomwear", "trousers", ("Men", "Women"), ("Formal", "Casual"), ("Trousers",), ("Formal", "Pleated", "Flat Front")),
    _Kind("Shorts", "Apparel", "Bottomwear", "shorts", ("Men", "Women"), ("Casual", "Sports"), ("Shorts",), ("Running", "Cargo", "Denim")),
    _Kind("Dresses", "Apparel", "Dress", "dress", ("Women",), ("Casual", "Party"), ("Dress",), ("A-line", "Maxi", "Printed", "Solid")),
    _Kind("Sports Shoes", "Footwear", "Shoes", "shoe", ("Men", "Women", "Unisex"), ("Sports",), ("Sports Shoes", "Running Shoes"), ("Running", "Training", "Mesh")),
    _Kind("Casual Shoes", "Footwear", "Shoes", "shoe", ("Men", "Women"), ("Casual",), ("Casual Shoes", "Sneakers"), ("Canvas", "Suede", "Leather")),
    _Kind("Heels", "Footwear", "Shoes", "heel", ("Women",), ("Casual", "Party"), ("Heels", "Pumps"), ("Stiletto", "Block", "Patent")),
    _Kind("Handbags", "Accessories", "Bags", "handbag", ("Women",), ("Casual", "Formal"), ("Handbag", "Tote Bag"), ("Leather", "Quilted", "Structured")),
    _Kind("Backpacks", "Accessories", "Bags", "backpack", ("Unisex", "Men", "Women"), ("Casual", "Sports"), ("Backpack",), ("Laptop", "Daypack", "Rugged")),
    _Kind("Watches", "Accessories", "Watches", "watch", ("Men", "Women"), ("Casual", "Formal"), ("Watch",), ("Analog", "Chronograph", "Classic")),
    _Kind("Caps", "Accessories", "Headwear", "cap", ("Unisex", "Men", "Women"), ("Casual", "Sports"), ("Cap",), ("Baseball", "Sports", "Cotton")),
)
BRANDS = ("Northwind", "Highpeak", "Corvid", "Tallgrass", "Meridian", "Ashford", "Kestrel", "Lumen", "Saltmarsh", "Orchard")
SEASONS = ("Summer", "Winter", "Fall", "Spring")
IMAGE_SIZE = 224


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * f))) for c in rgb)  # type: ignore[return-value]


def _detail(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A visible detail colour: darker for light colours, lighter for dark ones."""
    return _shade(rgb, 0.65) if sum(rgb) > 240 else tuple(min(255, c + 70) for c in rgb)  # type: ignore[return-value]


def draw_product(shape: str, rgb: tuple[int, int, int], rnd: random.Random):
    """A 224x224 RGB picture of a ``shape`` silhouette in ``rgb`` on white (slight random size/offset)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    s = rnd.uniform(0.85, 1.05)
    ox, oy = rnd.randint(-8, 8), rnd.randint(-8, 8)
    det = _detail(rgb)
    outline = _shade(rgb, 0.6) if sum(rgb) > 600 else None  # a white product needs an edge on white

    def P(x: float, y: float) -> tuple[float, float]:
        return (112 + (x - 112) * s + ox, 112 + (y - 112) * s + oy)

    def poly(points, fill, **kw):
        d.polygon([P(x, y) for x, y in points], fill=fill, outline=outline if fill == rgb else None, **kw)

    def rect(x0, y0, x1, y1, fill, r=0):
        (a, b), (c, e) = P(x0, y0), P(x1, y1)
        d.rounded_rectangle((a, b, c, e), radius=r * s, fill=fill, outline=outline if fill == rgb else None)

    def ellipse(x0, y0, x1, y1, fill, width=0, out=None):
        (a, b), (c, e) = P(x0, y0), P(x1, y1)
        d.ellipse((a, b, c, e), fill=fill, outline=out, width=int(width * s) if width else 1)

    if shape in ("top", "shirt"):
        poly([(70, 40), (95, 32), (129, 32), (154, 40), (196, 75), (178, 100), (158, 86), (158, 190), (66, 190), (66, 86), (46, 100), (28, 75)], rgb)
        if shape == "shirt":
            poly([(98, 32), (112, 58), (126, 32)], det)
            for y in (75, 100, 125, 150, 175):
                ellipse(109, y, 115, y + 6, det)
        else:
            ellipse(96, 26, 128, 46, (255, 255, 255))
    elif shape in ("trousers", "shorts"):
        bottom = 200 if shape == "trousers" else 120
        poly([(72, 28), (152, 28), (160, bottom), (120, bottom), (112, 70), (104, bottom), (64, bottom)], rgb)
        rect(72, 28, 152, 40, det)
    elif shape == "dress":
        rect(92, 20, 98, 48, rgb)
        rect(126, 20, 132, 48, rgb)
        poly([(88, 45), (136, 45), (142, 95), (182, 200), (42, 200), (82, 95)], rgb)
        rect(84, 92, 140, 100, det)
    elif shape == "shoe":
        poly([(40, 120), (80, 108), (110, 80), (150, 78), (160, 110), (196, 128), (196, 150), (36, 150)], rgb)
        rect(32, 146, 200, 162, (245, 245, 245) if sum(rgb) < 600 else (90, 90, 90), r=4)
        for x in (112, 124, 136):
            d.line([P(x, 86), P(x + 10, 100)], fill=det, width=max(1, int(3 * s)))
    elif shape == "heel":
        poly([(44, 120), (100, 112), (150, 88), (182, 80), (190, 96), (150, 118), (60, 140)], rgb)
        poly([(170, 90), (186, 92), (182, 170), (176, 170)], rgb)
        rect(40, 136, 70, 146, det)
    elif shape == "handbag":
        ellipse(78, 30, 146, 100, None, width=8, out=det)
        poly([(56, 70), (168, 70), (184, 190), (40, 190)], rgb)
        rect(104, 86, 120, 98, det, r=2)
    elif shape == "backpack":
        ellipse(86, 18, 138, 60, None, width=8, out=det)
        rect(58, 40, 166, 200, rgb, r=28)
        rect(78, 120, 146, 186, det, r=10)
    elif shape == "watch":
        rect(96, 16, 128, 208, rgb, r=8)
        ellipse(72, 76, 152, 156, (210, 210, 215))
        ellipse(80, 84, 144, 148, (255, 255, 255))
        d.line([P(112, 116), P(112, 92)], fill=(30, 30, 30), width=max(1, int(3 * s)))
        d.line([P(112, 116), P(130, 116)], fill=(30, 30, 30), width=max(1, int(3 * s)))
    elif shape == "cap":
        d.pieslice((P(52, 60)[0], P(52, 60)[1], P(172, 180)[0], P(172, 180)[1]), 180, 360, fill=rgb, outline=outline)
        poly([(150, 112), (210, 112), (204, 128), (150, 124)], det)
        ellipse(106, 56, 118, 68, det)
    else:  # pragma: no cover - every KINDS shape is drawn above
        raise ValueError(f"unknown shape {shape!r}")
    return img


def _title(rnd: random.Random, brand: str, gender: str, colour: str | None, kind: _Kind) -> str:
    noun = rnd.choice(kind.nouns)
    style = rnd.choice(kind.styles)
    g = {"Unisex": "Unisex", "Men": "Men", "Women": "Women"}[gender]
    parts = {
        0: [brand, g, colour, style, noun],
        1: [brand, g, style, colour, noun],
        2: [brand, style, colour, noun, "for", g],
    }[rnd.randrange(3)]
    return re.sub(r"\s+", " ", " ".join(p for p in parts if p)).strip()


def make_synthetic_catalog(
    out_dir: Path | str,
    n: int = 300,
    seed: int = 0,
    *,
    withheld_colour_fraction: float = 0.5,
    without_image_fraction: float = 0.1,
) -> Path:
    """Write a synthetic fashion catalog (CSV + drawn JPEGs) under ``out_dir``; return the CSV's path."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    for name, frac in (("withheld_colour_fraction", withheld_colour_fraction), ("without_image_fraction", without_image_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {frac!r}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    colours = list(COLOURS)
    full_rows: list[dict[str, str]] = []
    rows: list[dict[str, str]] = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)] if i < len(KINDS) else rnd.choice(KINDS)  # every kind appears
        pid = str(900000 + i)
        gender = rnd.choice(kind.genders)
        colour = rnd.choice(colours)
        brand = rnd.choice(BRANDS)
        has_image = rnd.random() >= without_image_fraction
        withhold = rnd.random() < withheld_colour_fraction
        full_title = _title(random.Random(rnd.getrandbits(32)), brand, gender, colour, kind)
        row = {
            "product_id": pid,
            "title": full_title,
            "gender": gender,
            "master_category": kind.master,
            "sub_category": kind.sub,
            "article_type": kind.article_type,
            "base_colour": colour,
            "season": rnd.choice(SEASONS),
            "year": str(rnd.randint(2010, 2018)),
            "usage": rnd.choice(kind.usages),
            "image": f"images/{pid}.jpg" if has_image else "",
        }
        full_rows.append(row)
        shown = dict(row)
        if withhold and has_image:  # only a picture can carry a withheld colour
            shown["title"] = re.sub(rf"\s*\b{re.escape(colour)}\b", "", full_title).strip()
            shown["base_colour"] = ""
        rows.append(shown)
        if has_image:
            pic = draw_product(kind.shape, COLOURS[colour], rnd)
            pic.save(images / f"{pid}.jpg", format="JPEG", quality=90, subsampling=0)
    for name, data in (("catalog.csv", rows), ("catalog_full.csv", full_rows)):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(data)
    log.info("synthetic catalog: %d products (%d with pictures) in %s", n, sum(1 for r in rows if r["image"]), out)
    return out / "catalog.csv"


def make_synthetic_queries(out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``queries.tsv`` and TREC ``qrels.tsv`` for a synthetic catalog made in ``out_dir``.

    One query per (colour, article type) present, worded like the benchmark's ("black heels"); graded
    from the full metadata (``catalog_full.csv``, colours not withheld) like the benchmark: 2 = that type
    in that colour, 1 = that type in another colour. Labels come from generated metadata, not judges.
    """
    out = Path(out_dir)
    with open(out / "catalog_full.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    pairs = sorted({(r["base_colour"], r["article_type"]) for r in rows})
    queries, qrels = out / "queries.tsv", out / "qrels.tsv"
    with open(queries, "w", encoding="utf-8") as fq, open(qrels, "w", encoding="utf-8") as fr:
        fq.write("query_id\tquery\tuser_id\n")
        for i, (colour, kind) in enumerate(pairs):
            qid = f"sq{i:04d}"
            fq.write(f"{qid}\t{colour.lower()} {kind.lower()}\t\n")
            for r in rows:
                if r["article_type"] == kind:
                    fr.write(f"{qid} 0 {r['product_id']} {2 if r['base_colour'] == colour else 1}\n")
    return queries, qrels


__all__ = ["COLOURS", "KINDS", "draw_product", "make_synthetic_catalog", "make_synthetic_queries"]
