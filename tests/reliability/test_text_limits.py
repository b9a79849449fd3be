"""Oversized text: catalog fields over their limits are row errors naming the limit (the rest of the file
is read); query texts over MAX_QUERY_CHARS are refused with ConfigError before any engine work."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import mappings
from indexing import fields as F
from indexing.catalog import DEFAULT_MAX_TEXT_CHARS, MAX_ID_BYTES, MAX_IMAGE_REF_CHARS, MAX_RECORD_BYTES, Product, RowError, read_catalog
from indexing.engines.base import BulkAction
from indexing.engines.local import LocalEngine
from indexing.errors import ConfigError
from rerank.limits import MAX_QUERY_CHARS, check_query_text
from rerank.retrieval.retriever import BM25, RetrievalConfig, Retriever


def test_catalog_text_limits_are_row_errors_naming_the_limit(tmp_path):
    long = "x" * (DEFAULT_MAX_TEXT_CHARS + 1)
    rows = [
        ["ok1", "a fine title", "", "images/a.jpg"],
        ["long_title", long, "", ""],
        ["long_desc", "title", long, ""],
        ["at_limit", "t" * DEFAULT_MAX_TEXT_CHARS, "", ""],
        ["é" * (MAX_ID_BYTES // 2 + 1), "id over 512 bytes in UTF-8", "", ""],
        ["long_ref", "title", "", "images/" + "a" * MAX_IMAGE_REF_CHARS + ".jpg"],
        ["ok2", "another title", "", ""],
    ]
    path = tmp_path / "c.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "title", "description", "image"])
        w.writerows(rows)
    items = list(read_catalog(path, images_root=tmp_path))
    assert [i.row for i in items] == list(range(len(rows)))
    reasons = {i.row: i.reason for i in items if isinstance(i, RowError)}
    assert reasons[1] == f"text too long: title has {DEFAULT_MAX_TEXT_CHARS + 1} characters (limit {DEFAULT_MAX_TEXT_CHARS})"
    assert reasons[2] == f"text too long: description has {DEFAULT_MAX_TEXT_CHARS + 1} characters (limit {DEFAULT_MAX_TEXT_CHARS})"
    assert reasons[4] == f"id too long: {2 * (MAX_ID_BYTES // 2 + 1)} bytes (limit {MAX_ID_BYTES})"
    assert reasons[5].startswith("image: reference too long") and f"limit {MAX_IMAGE_REF_CHARS}" in reasons[5]
    good = [i for i in items if isinstance(i, Product)]
    assert [p.id for p in good] == ["ok1", "at_limit", "ok2"]
    assert len(good[1].fields[F.TITLE]) == DEFAULT_MAX_TEXT_CHARS
    # the limit is a parameter
    small = {i.row: i for i in read_catalog(path, images_root=tmp_path, max_text_chars=5)}
    assert isinstance(small[0], RowError) and "title has 12 characters (limit 5)" in small[0].reason


def test_a_runaway_csv_record_is_isolated(tmp_path):
    """An unterminated quote would swallow the rest of the file; past MAX_RECORD_BYTES it is one bad row."""
    path = tmp_path / "c.csv"
    filler = ("y" * 1023 + "\n") * (MAX_RECORD_BYTES // 1024 + 2)
    path.write_text('id,title\nok1,fine\nbad,"never closed\n' + filler + "ok2,fine too\n")
    items = list(read_catalog(path))
    assert isinstance(items[0], Product) and items[0].id == "ok1"
    assert isinstance(items[1], RowError) and items[1].reason.startswith(f"malformed CSV: a record runs over {MAX_RECORD_BYTES} bytes")
    assert isinstance(items[-1], Product) and items[-1].id == "ok2"
    assert not any(isinstance(i, Product) and len(i.fields.get(F.TITLE, "")) > DEFAULT_MAX_TEXT_CHARS for i in items)


def test_jsonl_oversized_values_are_row_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [{"id": "a", "title": "ok"}, {"id": "b", "title": ["x" * 15_000, "y" * 15_000]}, {"id": "c", "title": "ok"}]
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    items = list(read_catalog(path))
    assert [type(i).__name__ for i in items] == ["Product", "RowError", "Product"]
    assert items[1].reason.startswith("text too long: title has 30001 characters")


# --------------------------------------------------------------------------- queries
def test_check_query_text_rule():
    assert check_query_text("  red shoes \n") == "red shoes"
    assert check_query_text("") == ""  # image-only queries have no text; callers decide
    assert check_query_text("é" * MAX_QUERY_CHARS) == "é" * MAX_QUERY_CHARS  # characters, not bytes
    assert check_query_text(" " * 10_000 + "q") == "q"  # surrounding whitespace does not count
    with pytest.raises(ConfigError, match=rf"^query too long: {MAX_QUERY_CHARS + 1} characters \(limit {MAX_QUERY_CHARS}\)"):
        check_query_text("q" * (MAX_QUERY_CHARS + 1))
    with pytest.raises(ConfigError, match="query too long: 11 characters \\(limit 10\\)"):
        check_query_text("hello world", max_chars=10)
    with pytest.raises(ConfigError, match="NUL"):
        check_query_text("shoe\x00s")
    with pytest.raises(ConfigError, match="query must be a string, got bytes"):
        check_query_text(b"shoes")


class _CountingEngine(LocalEngine):
    """The real LocalEngine, counting BM25 calls (to show a refused query never reaches it)."""

    bm25_calls = 0

    def bm25_search(self, *a, **kw):
        type(self).bm25_calls += 1
        return super().bm25_search(*a, **kw)


def test_retriever_refuses_overlong_queries_before_the_engine(tmp_path):
    engine = _CountingEngine(tmp_path / "engine")
    try:
        engine.create_index("p", mappings.load_mapping("products-v1", text_dim=4, image_dim=4))
        rng = np.random.default_rng(0)
        engine.bulk("p", [BulkAction.index(f"d{i}", {F.ID: f"d{i}", F.TITLE: f"red shoe model {i}", F.TEXT_VEC: rng.standard_normal(4).tolist()})
                          for i in range(5)])
        engine.refresh("p")
        r = Retriever(engine, "p", text_encoder=None, config=RetrievalConfig(lists=(BM25,)))
        at_limit = ("red shoe " * MAX_QUERY_CHARS)[:MAX_QUERY_CHARS]
        stage = r.first_stage(at_limit)
        assert _CountingEngine.bm25_calls == 1 and len(stage.lists[BM25]) == 5
        with pytest.raises(ConfigError, match=rf"query too long: {MAX_QUERY_CHARS + 1} characters"):
            r.first_stage(at_limit + "s")
        with pytest.raises(ConfigError, match="query too long"):
            r.retrieve("shoe " * 100_000)
        assert _CountingEngine.bm25_calls == 1
    finally:
        engine.close()
