"""``LocalEngine.get_arrays`` (the reranker's vector fetch) gives what ``get`` gives, as numpy rows, and
``array_getter`` never routes around a ``get`` that a wrapper or subclass overrides."""

from __future__ import annotations

import numpy as np
import pytest

import mappings
from indexing import fields as F
from indexing.engines.base import BulkAction
from indexing.engines.base import array_getter
from indexing.engines.local import LocalEngine
from indexing.errors import ConfigError

TD, IMG = 8, 4


@pytest.fixture()
def eng(tmp_path):
    e = LocalEngine(tmp_path / "engine")
    e.create_index("p", mappings.load_mapping("products-v1", text_dim=TD, image_dim=IMG))
    rng = np.random.default_rng(0)
    docs = []
    for i in range(12):
        d = {F.ID: f"d{i}", F.TITLE: f"red shoe {i}", F.COLOUR: "Red", F.TEXT_VEC: rng.standard_normal(TD).astype(np.float32).tolist()}
        if i % 3:
            d[F.IMAGE_VEC] = rng.standard_normal(IMG).astype(np.float32).tolist()
        docs.append(BulkAction.index(f"d{i}", d))
    e.bulk("p", docs)
    e.bulk("p", [BulkAction.index("d4", {F.ID: "d4", F.TITLE: "updated", F.TEXT_VEC: [1.0] * TD}), BulkAction.delete("d5")])
    e.refresh("p")
    yield e
    e.close()


@pytest.mark.parametrize("fields", [None, [F.TEXT_VEC, F.IMAGE_VEC, F.COLOUR], [F.IMAGE_VEC], [F.TITLE]])
def test_get_arrays_holds_the_same_values_as_get(eng, fields):
    ids = ["d9", "d0", "missing", "d4", "d5", "d1", "d0"]
    ref = eng.get("p", ids, fields=fields)
    got = eng.get_arrays("p", ids, fields=fields)
    assert sorted(got) == sorted(ref) and "missing" not in got and "d5" not in got  # d5 deleted, d4 updated
    if fields is not None:  # the fast path (ids mapped by the snapshot, not searched): request order, each id once
        assert list(got) == ["d9", "d0", "d4", "d1"]
    for i, src in ref.items():
        assert set(got[i]) == set(src)
        for k, v in src.items():
            if k in (F.TEXT_VEC, F.IMAGE_VEC):
                a = got[i][k]
                assert isinstance(a, np.ndarray) and a.dtype == np.float32 and not a.flags.writeable
                assert a.tolist() == v  # the same floats, bit for bit
            else:
                assert got[i][k] == v
    if fields is None or F.TEXT_VEC in fields:
        assert got["d4"][F.TEXT_VEC].tolist() == [1.0] * TD  # the newest version
    with pytest.raises(ConfigError):
        eng.get_arrays("p", "d1")


def test_rows_are_read_only_copies_not_the_snapshot_buffer(eng):
    a = eng.get_arrays("p", ["d1"], fields=[F.TEXT_VEC])["d1"][F.TEXT_VEC]
    b = eng.get_arrays("p", ["d1"], fields=[F.TEXT_VEC])["d1"][F.TEXT_VEC]
    assert not np.shares_memory(a, b)  # views into the engine's matrix would share it
    with pytest.raises(ValueError):
        a[0] = 42.0


def test_the_source_cache_never_serves_a_replaced_document(eng, monkeypatch):
    import indexing.engines.local as local

    fields = [F.COLOUR, F.TITLE]
    first = eng.get_arrays("p", ["d1", "d2"], fields=fields)
    assert first["d1"] == {F.COLOUR: "Red", F.TITLE: "red shoe 1"}
    summary = eng.bulk("p", [BulkAction.index("d1", {F.ID: "d1", F.TITLE: "blue boot", F.COLOUR: "Blue", F.TEXT_VEC: [0.5] * TD})])
    assert not summary.failed
    eng.refresh("p")
    again = eng.get_arrays("p", ["d1", "d2"], fields=fields + [F.TEXT_VEC])
    assert again["d1"][F.COLOUR] == "Blue" and again["d1"][F.TEXT_VEC].tolist() == [0.5] * TD
    assert {k: v for k, v in again["d2"].items() if k != F.TEXT_VEC} == first["d2"]
    monkeypatch.setattr(local, "SOURCE_CACHE_SIZE", 3)
    eng.get_arrays("p", [f"d{i}" for i in range(12)], fields=[F.COLOUR])
    assert len(eng._source_cache) == 3  # bounded


def test_cached_values_are_not_shared_with_callers(eng):
    st = eng._state("p")
    addrs, found, seqs = eng._lookup(st, ["d1"])
    eng._source_cache[(st.handle.uuid, int(seqs[0]))] = {F.COLOUR: "Red", "nested": {"a": [1, 2]}}
    got = eng.get_arrays("p", ["d1"], fields=["nested", F.COLOUR])["d1"]
    got["nested"]["a"].append(3)
    assert eng.get_arrays("p", ["d1"], fields=["nested"])["d1"] == {"nested": {"a": [1, 2]}}


class _Wrapper:
    """Counts ``get`` and delegates the rest (like test doubles that inject faults)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def get(self, *a, **kw):
        self.calls += 1
        return self.inner.get(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Sub(LocalEngine):
    def get(self, *a, **kw):
        raise RuntimeError("overridden get")


def test_array_getter_uses_get_arrays_only_when_get_is_the_engines_own(eng, tmp_path):
    assert array_getter(eng) == eng.get_arrays
    w = _Wrapper(eng)
    assert array_getter(w) == w.get  # delegation through __getattr__ does not bypass the wrapper's get
    array_getter(w)("p", ["d1"])
    assert w.calls == 1
    sub = _Sub(tmp_path / "sub")
    try:
        assert array_getter(sub) == sub.get
    finally:
        sub.close()
    eng.get = lambda *a, **kw: {}  # an instance patch of get wins too
    assert array_getter(eng) == eng.get


def test_stored_sources_read_back_as_written_also_where_the_fast_parser_refuses_them(eng):
    """Sources are parsed by orjson, and by the stdlib where orjson refuses what ``json.dumps`` writes (NaN,
    infinities, integers beyond 64 bits: a strict mapping refuses them in a document, as OpenSearch does, but the
    reader does not count on it): the values come back as written."""
    import json
    import math

    from indexing.engines.local import load_source

    odd = {F.ID: "odd", F.TITLE: "Crème brûlée ☕ \"shoe\" \\ 10%", F.COLOUR: "Café", F.TEXT_VEC: [0.5] * TD}
    res = eng.bulk("p", [BulkAction.index("odd", odd)], refresh=True)
    assert res.succeeded == 1, res
    for got in (eng.get("p", ["odd"])["odd"], eng.get_arrays("p", ["odd"], fields=[F.ID, F.TITLE, F.COLOUR])["odd"]):
        assert {k: got[k] for k in (F.ID, F.TITLE, F.COLOUR)} == {k: odd[k] for k in (F.ID, F.TITLE, F.COLOUR)}
    written = json.dumps({"a": float("nan"), "b": float("-inf"), "c": "é", "d": [1, None], "e": 2**70}).encode()
    back = load_source(written)
    assert math.isnan(back["a"]) and back["b"] == float("-inf") and back["c"] == "é" and back["d"] == [1, None] and back["e"] == 2**70
    plain = json.dumps({"a": 1.5, "b": "é", "c": [1, None], "d": {"e": True}}).encode()
    assert load_source(plain) == json.loads(plain)
    with pytest.raises(ValueError):  # not JSON at all: the stdlib's error, not a silent value
        load_source(b"{not json")
