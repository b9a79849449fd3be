"""Catalog readers on the real catalogs, and every kind of bad row."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexing import fields as F
from indexing.catalog import (
    CHECKPOINT_EVERY,
    FieldMap,
    Product,
    RowError,
    catalog_columns,
    detect_field_map,
    preset_field_map,
    read_catalog,
    scan_catalog,
)
from indexing.errors import CatalogError, UnknownNameError

REPO = Path(__file__).resolve().parents[2]
FASHION_COLUMNS = ["product_id", "title", "gender", "master_category", "sub_category", "article_type", "base_colour", "season", "year", "usage", "image"]


@pytest.fixture(scope="module")
def bench(shared_data) -> Path:
    return shared_data / "fashion" / "bench" / "catalog.csv"


@pytest.fixture(scope="module")
def bench_rows(bench) -> list[dict[str, str]]:
    with open(bench, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bench_products(bench) -> list[Product | RowError]:
    return list(read_catalog(bench))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------ field maps


def test_presets_and_detection(shared_data, bench):
    assert detect_field_map(catalog_columns(shared_data / "fashion" / "products.csv")).name == "fashion"
    assert detect_field_map(catalog_columns(bench)).name == "fashion"
    assert detect_field_map(catalog_columns(shared_data / "homedepot" / "catalog.csv")).name == "homedepot"
    generic = detect_field_map(["SKU", "Name", "Description", "Brand", "Price", "Color", "image_url"])
    assert (generic.name, generic.id, generic.title, generic.description, generic.brand, generic.price, generic.image) == (
        "generic", "SKU", "Name", "Description", "Brand", "Price", "image_url")
    assert dict(generic.keywords) == {F.COLOUR: "Color"}
    with pytest.raises(CatalogError, match="cannot tell the title column"):
        detect_field_map(["id", "colour"])
    with pytest.raises(UnknownNameError, match="valid catalog presets: fashion, homedepot"):
        preset_field_map("amazon")
    with pytest.raises(CatalogError, match="'price' is not a keyword field"):
        FieldMap(id="id", title="t", keywords={"price": "p"})


def test_fashion_rows_map_onto_document_fields(bench_rows, bench_products):
    assert len(bench_products) == len(bench_rows) == 12_000
    assert all(isinstance(p, Product) for p in bench_products)
    for raw, p in zip(bench_rows[:300], bench_products[:300]):
        assert p.id == raw["product_id"]
        f = p.fields
        assert f[F.TITLE] == " ".join(raw["title"].split())  # whitespace runs collapsed
        assert f[F.CATEGORY] == " > ".join([raw["master_category"], raw["sub_category"], raw["article_type"]])
        assert f[F.ARTICLE_TYPE] == raw["article_type"] and f[F.GENDER] == raw["gender"]
        assert f[F.YEAR] == int(raw["year"])
        assert p.image == (raw["image"] or None)
        if raw["base_colour"]:
            assert f[F.COLOUR] == raw["base_colour"] and f[F.ATTRIBUTES].startswith(raw["base_colour"])
        else:  # the withheld colour stays missing: never invented
            assert F.COLOUR not in f and all(c not in f[F.ATTRIBUTES] for c in ("Black", "Blue", "White", "Red"))
        for name in ("usage", "season"):
            if raw[name]:
                assert raw[name] in f[F.ATTRIBUTES]
        assert set(f) <= {F.TITLE, F.CATEGORY, F.ATTRIBUTES, F.ARTICLE_TYPE, F.COLOUR, F.GENDER, F.USAGE, F.SEASON, F.YEAR}


def test_homedepot_catalog(shared_data):
    path = shared_data / "homedepot" / "catalog.csv"
    items = list(read_catalog(path, start=100, stop=200))
    assert [p.row for p in items] == list(range(100, 200))
    assert all(isinstance(p, Product) and set(p.fields) == {F.TITLE} and p.image is None for p in items)
    assert scan_catalog(path).rows == 54_667


def test_scan_counts_rows_and_finds_duplicates_across_the_file(shared_data, tmp_path, bench_rows):
    s = scan_catalog(shared_data / "fashion" / "products.csv")
    assert (s.rows, s.duplicate_rows, s.field_map.name) == (44_446, frozenset(), "fashion")
    rows = [[r[c] for c in FASHION_COLUMNS] for r in bench_rows[:3000]]
    rows.append(list(rows[10]))  # row 3000 repeats row 10
    rows.append(list(rows[2500]))  # row 3001 repeats row 2500
    rows.append(list(rows[10]))  # row 3002 repeats row 10 again
    path = _write_csv(tmp_path / "dups.csv", FASHION_COLUMNS, rows)
    scan = scan_catalog(path)
    assert scan.rows == 3003 and scan.duplicate_rows == {3000, 3001, 3002}
    # a range that holds only the repeats knows them from the scan
    tail = list(read_catalog(path, start=2990, stop=3003, duplicate_rows=scan.duplicate_rows))
    errs = [e for e in tail if isinstance(e, RowError)]
    assert [(e.row, e.kind) for e in errs] == [(3000, "duplicate id"), (3001, "duplicate id"), (3002, "duplicate id")]
    assert errs[0].id == bench_rows[10]["product_id"]
    # the full read finds them by itself, naming the first occurrence
    full_errs = [e for e in read_catalog(path) if isinstance(e, RowError)]
    assert [e.row for e in full_errs] == [3000, 3001, 3002]
    assert "first seen at row 10" in full_errs[0].reason


# ------------------------------------------------------------------------------ bad rows


def test_every_bad_row_kind_is_recorded_and_reading_goes_on(tmp_path):
    header = ["id", "title", "description", "price", "image"]
    long_text = "x" * 300_000  # over csv's own 128 KiB field limit too: must not abort the file
    rows = [
        ["p0", "Good shoe", "fine", "19.99", "img/p0.jpg"],
        ["", "No id", "", "1", ""],
        ["p0", "Same id again", "", "2", ""],
        ["p3", "Long", long_text, "3", ""],
        ["p4", "Pricey", "", "twelve", ""],
        ["p5", "Too", "many", "1", "", "extra"],
        ["p6", "Negative", "", "-5", ""],
        ["p7", "Escape", "", "1", "../../etc/passwd"],
        ["p8", "Absolute", "", "1", "/etc/passwd"],
        ["p9", "Scheme", "", "1", "file:///etc/passwd"],
        ["p10", "", "no title", "1", ""],
        ["p11", "Remote photo", "", "", "https://cdn.example.com/p11.jpg"],
        ["p12", "Missing photo file is not checked here", "", "7", "img/none.jpg"],
    ]
    path = _write_csv(tmp_path / "bad.csv", header, rows)
    items = list(read_catalog(path, images_root=tmp_path, max_text_chars=10_000))
    assert [i.row for i in items] == list(range(len(rows)))
    kinds = {i.row: (i.kind if isinstance(i, RowError) else "ok") for i in items}
    assert kinds == {
        0: "ok",
        1: "missing id",
        2: "duplicate id",
        3: "text too long",
        4: "non-numeric price",
        5: "wrong column count",
        6: "negative price",
        7: "image",
        8: "image",
        9: "image",
        10: "missing title",
        11: "ok",
        12: "ok",
    }
    by_row = {i.row: i for i in items}
    assert by_row[2].id == "p0" and "first seen at row 0" in by_row[2].reason
    assert "description has 300000 characters (limit 10000)" in by_row[3].reason
    assert "'twelve'" in by_row[4].reason
    assert "expected 5 fields, got 6" in by_row[5].reason
    assert "outside the images root" in by_row[7].reason and "outside the images root" in by_row[8].reason
    assert "unsupported scheme 'file'" in by_row[9].reason
    assert by_row[0].fields[F.PRICE] == pytest.approx(19.99) and by_row[11].image.startswith("https://")
    assert F.PRICE not in by_row[11].fields  # empty price is missing, not 0


def test_malformed_csv_records_are_isolated(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b'product_id,title\n1,"ab"c\n2,fine\n3,"bad \xff\xfe bytes"\n4,"unterminated\n5,last\n')
    items = list(read_catalog(path))
    assert [(i.row, i.kind if isinstance(i, RowError) else i.id) for i in items] == [
        (0, "malformed CSV"),
        (1, "2"),
        (2, "encoding"),
        (3, "malformed CSV"),  # the unterminated quote swallows to the end: one error, then resync
        (4, "5"),
    ]
    assert scan_catalog(path).rows == 5


def test_jsonl_bad_lines(tmp_path):
    lines = [
        json.dumps({"id": "a", "title": "Red dress", "price": 10, "category": ["Apparel", "Dress"]}),
        "{not json",
        "",  # blank lines are not rows
        "[1, 2]",
        json.dumps({"id": "b", "title": "Blue shirt", "price": "n/a"}),
        json.dumps({"id": "c", "title": "Cap", "price": None, "rating": 4.5}),
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(read_catalog(path))
    assert [(i.row, i.kind if isinstance(i, RowError) else i.id) for i in items] == [
        (0, "a"),
        (1, "malformed JSON"),
        (2, "malformed JSON"),
        (3, "non-numeric price"),
        (4, "c"),
    ]
    assert items[0].fields[F.CATEGORY] == "Apparel > Dress" and items[4].fields[F.RATING] == 4.5
    assert "not an object" in items[2].reason
    assert scan_catalog(path).rows == 5


def test_unreadable_catalogs_raise(tmp_path, bench):
    with pytest.raises(CatalogError, match="unsupported file type '.xlsx'"):
        read_catalog(tmp_path / "c.xlsx")
    with pytest.raises(CatalogError, match="does not exist"):
        read_catalog(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(CatalogError, match="empty"):
        read_catalog(tmp_path / "empty.csv")
    with pytest.raises(CatalogError, match="lacks the column\\(s\\) brand"):
        read_catalog(bench, field_map=FieldMap(id="product_id", title="title", brand="brand"))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(CatalogError, match="not a readable Parquet file"):
        read_catalog(tmp_path / "x.parquet")
    with pytest.raises(ValueError):
        read_catalog(bench, start=5, stop=2)


# ------------------------------------------------------------------------------ formats and ranges


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory, bench_rows):
    """The first 2,500 bench rows as CSV, JSONL and Parquet (typed year, small row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("formats")
    rows = bench_rows[:2500]
    csv_path = _write_csv(d / "c.csv", FASHION_COLUMNS, [[r[c] for c in FASHION_COLUMNS] for r in rows])
    with open(d / "c.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({**r, "year": int(r["year"])}) + "\n")
    cols = {c: [r[c] for r in rows] for c in FASHION_COLUMNS}
    cols["year"] = [int(y) for y in cols["year"]]
    cols["image"] = [v or None for v in cols["image"]]
    pq.write_table(pa.table(cols), d / "c.parquet", row_group_size=300)
    return {"csv": csv_path, "jsonl": d / "c.jsonl", "parquet": d / "c.parquet"}


def test_csv_jsonl_and_parquet_give_the_same_products(three_formats, bench_products):
    got = {k: list(read_catalog(p)) for k, p in three_formats.items()}
    assert got["csv"] == got["jsonl"] == got["parquet"] == bench_products[:2500]
    assert got["jsonl"][0].fields == bench_products[0].fields  # field map detected from the JSON keys
    assert {k: scan_catalog(p).rows for k, p in three_formats.items()} == {"csv": 2500, "jsonl": 2500, "parquet": 2500}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_range_reads_equal_the_full_read_sliced(three_formats, fmt):
    path = three_formats[fmt]
    full = list(read_catalog(path))
    bounds = [0, 1, 299, 300, 301, 1023, 1024, 1025, 2047, 2048, 2400, 2500, 2600]
    for a, b in zip(bounds, bounds[1:]):
        assert list(read_catalog(path, start=a, stop=b)) == full[a:b], (a, b)
    assert list(read_catalog(path, start=2000)) == full[2000:]


def test_range_reads_with_multiline_fields_cold_and_warm(tmp_path):
    """Quoted newlines break naive line seeking; checkpoints sit on record boundaries."""
    n = 3 * CHECKPOINT_EVERY + 17
    rows = [[f"id{i}", f"Title {i}", f"line one\nline two of {i}\n\"quoted\", too", str(i % 50)] for i in range(n)]
    path = _write_csv(tmp_path / "ml.csv", ["id", "title", "description", "price"], rows)
    probe = (
        "import json,sys; from indexing.catalog import read_catalog\n"
        f"print(json.dumps([p.id for p in read_catalog({str(path)!r}, start={2 * CHECKPOINT_EVERY + 5}, stop={2 * CHECKPOINT_EVERY + 9})]))"
    )
    cold = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cold.returncode == 0, cold.stderr
    expected = [f"id{i}" for i in range(2 * CHECKPOINT_EVERY + 5, 2 * CHECKPOINT_EVERY + 9)]
    assert json.loads(cold.stdout) == expected  # a fresh process, no checkpoints: parses from the top
    scan_catalog(path)  # warms the checkpoints
    for a in (0, CHECKPOINT_EVERY - 1, CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY + 5, n - 3):
        got = list(read_catalog(path, start=a, stop=a + 3))
        assert [p.id for p in got] == [f"id{i}" for i in range(a, min(a + 3, n))]
        assert all(p.fields[F.DESCRIPTION].endswith('"quoted", too') for p in got)


def test_reading_a_range_does_not_open_image_files(tmp_path, bench):
    # an images root without any files: products still come out, image references as given
    items = list(read_catalog(bench, images_root=tmp_path))
    assert all(isinstance(p, Product) for p in items)
    assert sum(1 for p in items if p.image and p.image.startswith("images/")) == 9_583


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.text(max_size=8),
            st.text(max_size=30),
            st.one_of(st.text(max_size=6), st.floats(allow_nan=True).map(str)),
        ),
        max_size=25,
    )
)
def test_reader_never_crashes_and_accounts_for_every_row(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("h") / "h.csv"
    _write_csv(path, ["id", "title", "price"], [list(r) for r in rows])
    items = list(read_catalog(path))
    scan = scan_catalog(path)
    # every written record is either a product or an error, in order (blank records are not rows)
    assert [i.row for i in items] == list(range(scan.rows))
    for i in items:
        if isinstance(i, Product):
            assert i.id and i.fields[F.TITLE]
            assert F.PRICE not in i.fields or i.fields[F.PRICE] >= 0
