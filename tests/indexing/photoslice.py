"""A small slice of the fashion benchmark catalog with its real photos, for the photo-attribute tests."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path


def photo_catalog_slice(shared: Path, out: Path, n: int) -> tuple[Path, list[dict[str, str]]]:
    """The first ``n`` photographed products of ``bench/catalog.csv`` written to ``out/catalog.csv`` with their photos
    copied under ``out`` (the catalog's relative image paths stay valid); returns the catalog path and its rows."""
    src = shared / "fashion" / "bench" / "catalog.csv"
    with src.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = [r for _, r in zip(range(n), (r for r in reader if r["image"]))]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        shutil.copy(shared / "fashion" / r["image"], out / r["image"])
    return write_catalog(out / "catalog.csv", rows, header), rows


def write_catalog(path: Path, rows: list[dict[str, str]], header: list[str] | None = None) -> Path:
    """``rows`` as a catalog CSV at ``path`` (columns: ``header``, else the first row's keys)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(header or rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
