"""Property-based tests (hypothesis) of the parts that take untrusted or varied input: the catalog
reader, the score fusion functions and the fusion model's feature builder."""

from __future__ import annotations

import csv
import json
import math
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexing import fields as F
from indexing.catalog import Product, RowError, read_catalog, scan_catalog
from indexing.errors import CatalogError
from indexing.images import check_image_ref
from rerank.retrieval.fusion import MIN_SCORE, minmax, ranked_list, rrf
from rerank.model.inputs import EVENT_TYPES, FeatureSpec, HistoryInput, build_request_features
from rerank.retrieval.retriever import LISTS, Candidate

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --------------------------------------------------------------------------- catalog reader
GOOD_IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10)
GOOD_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=30)
HOSTILE_REFS = st.sampled_from(
    ["../../etc/passwd", "/etc/passwd", "images/../../x.jpg", "file:///etc/passwd", "javascript:alert(1)", "images/a.jpg\x00",
     "ftp://h/x.jpg", "..", "http://", "images/a.jpg", "https://cdn.example/x.jpg", "", "  "]
)
ANY_CELL = st.one_of(
    st.text(max_size=20),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    HOSTILE_REFS,
)


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _check_items(items, rows: int, root: Path) -> None:
    """Invariants of any read: every row accounted for, in order; products are valid."""
    assert [i.row for i in items] == list(range(rows))
    seen = set()
    for i in items:
        assert isinstance(i, (Product, RowError))
        if isinstance(i, RowError):
            assert i.reason and ":" in i.reason or i.reason in ("missing id",)
            continue
        assert i.id and i.id not in seen and i.fields[F.TITLE]
        seen.add(i.id)
        for k in (F.PRICE, F.RATING, F.POPULARITY):
            if k in i.fields:
                assert math.isfinite(i.fields[k])
        assert i.fields.get(F.PRICE, 0) >= 0
        if i.image:
            check_image_ref(i.image, root)  # a product never carries a reference the reader refuses


@SETTINGS
@given(
    good=st.lists(st.tuples(GOOD_IDS, GOOD_TEXT, st.floats(0, 1e6, allow_nan=False), st.sampled_from(["", "images/a.jpg", "https://cdn.example/x.jpg"])),
                  max_size=12, unique_by=lambda t: t[0]),
    bad=st.lists(st.tuples(ANY_CELL, ANY_CELL, ANY_CELL, ANY_CELL), max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_csv_reader_survives_garbage_rows_and_keeps_every_good_row(tmp_path_factory, good, bad, seed):
    root = tmp_path_factory.mktemp("root")
    good_rows = [[f"g-{i}", t, repr(p), img] for i, t, p, img in good]  # "g-" ids: bad rows cannot collide
    bad_rows = [[c if not c.startswith("g-") else "x" + c for c in map(str, r)] for r in bad]
    rows = good_rows + bad_rows
    random.Random(seed).shuffle(rows)
    path = tmp_path_factory.mktemp("c") / "c.csv"
    _write(path, ["id", "title", "price", "image"], rows)
    items = list(read_catalog(path, images_root=root))
    scan = scan_catalog(path)
    _check_items(items, scan.rows, root)
    products = {i.id: i for i in items if isinstance(i, Product)}
    for gid, title, price, img in good_rows:
        p = products.get(gid)
        assert p is not None, (gid, [i for i in items if getattr(i, "id", None) == gid])
        assert p.fields[F.TITLE] == unicodedata.normalize("NFC", title) and p.fields[F.PRICE] == pytest.approx(float(price))
        assert p.image == (img or None)
    # a range read is the full read sliced
    if scan.rows >= 2:
        mid = scan.rows // 2
        part = list(read_catalog(path, images_root=root, start=mid, stop=scan.rows, duplicate_rows=scan.duplicate_rows))
        assert [i.row for i in part] == list(range(mid, scan.rows))


@SETTINGS
@given(lines=st.lists(st.one_of(st.text(max_size=40), st.text(alphabet='",\n\r\\ ab', max_size=40)), max_size=15))
def test_csv_reader_never_crashes_on_raw_garbage_lines(tmp_path_factory, lines):
    root = tmp_path_factory.mktemp("root")
    path = tmp_path_factory.mktemp("c") / "c.csv"
    path.write_text("id,title,image\n" + "\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        items = list(read_catalog(path, images_root=root))
        scan = scan_catalog(path)
    except CatalogError as e:  # the only documented whole-file failure
        assert str(e)
        return
    _check_items(items, scan.rows, root)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(records=st.lists(st.one_of(
    st.fixed_dictionaries({"id": JSON_VALUES, "title": JSON_VALUES}, optional={"price": JSON_VALUES, "image": st.one_of(JSON_VALUES, HOSTILE_REFS)}),
    JSON_VALUES,
    st.text(max_size=20),  # not JSON at all
), max_size=15))
def test_jsonl_reader_never_crashes(tmp_path_factory, records):
    root = tmp_path_factory.mktemp("root")
    path = tmp_path_factory.mktemp("c") / "c.jsonl"
    lines = [r.replace("\n", " ") if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        items = list(read_catalog(path, field_map=None, images_root=root))
        scan = scan_catalog(path)
    except CatalogError as e:
        assert str(e)
        return
    _check_items(items, scan.rows, root)


# --------------------------------------------------------------------------- fusion
SCORES = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
IDS = st.sampled_from([f"d{i}" for i in range(12)])
LISTS_ST = st.dictionaries(st.sampled_from(list(LISTS)), st.lists(st.tuples(IDS, SCORES), max_size=10), min_size=1, max_size=3)


def _check_fused(out, lists) -> None:
    ids = [d.id for d in out]
    union = {str(i) for items in lists.values() for i, _ in items}
    assert len(ids) == len(set(ids)) and set(ids) == union
    assert [d.rank for d in out] == list(range(1, len(out) + 1))
    assert all(math.isfinite(d.score) for d in out)
    keys = [(-d.score, d.id) for d in out]
    assert keys == sorted(keys)
    for d in out:
        assert set(d.signals) == set(lists)
        for name, items in lists.items():
            assert d.signals[name].missing == (d.id not in {i for i, _ in items})


def _shuffled(lists, seed):
    rnd = random.Random(seed)
    names = list(lists)
    rnd.shuffle(names)
    out = {}
    for n in names:
        items = list(lists[n])
        rnd.shuffle(items)
        out[n] = items
    return out


@settings(max_examples=150, deadline=None)
@given(lists=LISTS_ST, seed=st.integers(0, 2**32 - 1), k=st.integers(1, 100))
def test_rrf_properties(lists, seed, k):
    out = rrf(lists, rank_constant=k)
    _check_fused(out, lists)
    assert all(0 < d.score <= len(lists) / (k + 1) + 1e-12 for d in out)
    again = rrf(_shuffled(lists, seed), rank_constant=k)
    assert [(d.id, d.score) for d in again] == [(d.id, pytest.approx(d.score)) for d in out]
    # one list: the fused order is the list's own order (score desc, id asc)
    name = next(iter(lists))
    single = rrf({name: lists[name]}, rank_constant=k)
    assert [d.id for d in single] == [i for i, _ in ranked_list(name, lists[name])]
    # top_n is a prefix
    assert [d.id for d in rrf(lists, rank_constant=k, top_n=3)] == [d.id for d in out][:3]


@settings(max_examples=150, deadline=None)
@given(lists=LISTS_ST, seed=st.integers(0, 2**32 - 1), missing=st.sampled_from(["exclude", "zero"]))
def test_minmax_properties(lists, seed, missing):
    out = minmax(lists, missing=missing)
    _check_fused(out, lists)
    lo = MIN_SCORE if missing == "exclude" else 0.0
    assert all(lo - 1e-12 <= d.score <= 1.0 + 1e-12 for d in out)
    again = minmax(_shuffled(lists, seed), missing=missing)
    assert [(d.id, d.score) for d in again] == [(d.id, pytest.approx(d.score)) for d in out]
    # one list: fused scores never increase along the list's own order (normalization is monotone)
    name = next(iter(lists))
    single = {d.id: d.score for d in minmax({name: lists[name]})}
    ordered = [single[i] for i, _ in ranked_list(name, lists[name])]
    assert all(a >= b for a, b in zip(ordered, ordered[1:]))
    if ordered:
        assert ordered[0] == 1.0


def test_minmax_stays_finite_at_the_extremes_of_float():
    out = minmax({"bm25": [("a", 1e308), ("b", -1e308), ("c", 0.0)]})
    assert all(math.isfinite(d.score) for d in out)
    assert [d.id for d in out] == ["a", "c", "b"]


# --------------------------------------------------------------------------- feature builder
DT, DI = 6, 5


def _vec(dim: int):
    return st.one_of(
        st.none(),
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=dim, max_size=dim),
        st.just([float("nan")] * dim),  # a corrupt stored vector: must be masked, never fed to the model
    )


DOC = st.one_of(
    st.none(),  # the document is missing from the index
    st.fixed_dictionaries({F.TEXT_VEC: _vec(DT), F.IMAGE_VEC: _vec(DI)},
                          optional={F.ARTICLE_TYPE: st.text(max_size=8), F.COLOUR: st.text(max_size=8), F.BRAND: st.none() | st.text(max_size=8)}),
)
HISTORY = st.one_of(
    st.none(),
    st.integers(0, 30).flatmap(lambda n: st.builds(
        HistoryInput,
        product_ids=st.just(tuple(f"h{i}" for i in range(n))),
        text=st.tuples(*[_vec(DT)] * n),
        image=st.tuples(*[_vec(DI)] * n),
        events=st.tuples(*[st.sampled_from(list(EVENT_TYPES) + ["refund", ""])] * n),
        ages_s=st.tuples(*[st.floats(-1e6, 1e10, allow_nan=False)] * n),
    )),
)


def _project(raw: np.ndarray) -> np.ndarray:
    w = np.arange(DI * DT, dtype=np.float32).reshape(DI, DT) / (DI * DT)
    return raw @ w


@settings(max_examples=60, deadline=None)
@given(lists=LISTS_ST, docs=st.lists(DOC, min_size=12, max_size=12), history=HISTORY, with_project=st.booleans(),
       query=st.lists(st.floats(-5, 5, allow_nan=False), min_size=DT, max_size=DT), k=st.integers(1, 25))
def test_feature_builder_properties(lists, docs, history, with_project, query, k):
    spec = FeatureSpec(history_k=k)
    cands = [Candidate(d.id, d.score, d.rank, d.signals) for d in rrf(lists)]
    by_id = {f"d{i}": doc for i, doc in enumerate(docs)}
    f = build_request_features(np.asarray(query), cands, by_id, spec, history=history,
                               project=_project if with_project else None, text_dim=DT, image_dim=DI)
    n = len(cands)
    assert f.ids == tuple(c.id for c in cands) and len(f) == n
    shapes = {
        "query": (DT,), "cand_text": (n, DT), "cand_text_mask": (n,), "cand_image": (n, DT), "cand_image_mask": (n,),
        "first_stage": (n, spec.first_stage_dim), "cats": (n, len(spec.cat_fields)),
        "hist_text": (k, DT), "hist_text_mask": (k,), "hist_image": (k, DT), "hist_image_mask": (k,),
        "hist_event": (k,), "hist_age": (k,), "hist_mask": (k,),
    }
    for name, shape in shapes.items():
        a = getattr(f, name)
        assert a.shape == shape, (name, a.shape, shape)
        if a.dtype.kind == "f":
            assert np.isfinite(a).all(), name
    for i, c in enumerate(cands):
        d = by_id.get(c.id)
        tv = d.get(F.TEXT_VEC) if d else None
        iv = d.get(F.IMAGE_VEC) if d else None
        assert f.cand_text_mask[i] == (tv is not None and np.isfinite(tv).all())
        assert f.cand_image_mask[i] == (with_project and iv is not None and np.isfinite(iv).all())
        if not f.cand_text_mask[i]:
            assert not f.cand_text[i].any()
        if not f.cand_image_mask[i]:
            assert not f.cand_image[i].any()
    assert ((f.cats >= 0) & (f.cats < spec.hash_buckets)).all()
    # history: the newest k items that have a usable vector; padding and masked rows are all zero
    h = history or HistoryInput()
    m = min(len(h.product_ids), k)
    assert f.hist_ids == tuple(h.product_ids[:m])
    assert not f.hist_mask[m:].any()
    assert (f.hist_text_mask <= f.hist_mask).all() and (f.hist_image_mask <= f.hist_mask).all()
    assert not f.hist_text[~f.hist_text_mask].any() and not f.hist_image[~f.hist_image_mask].any()
    assert not f.hist_event[~f.hist_mask].any() and not f.hist_age[~f.hist_mask].any()
    assert (f.hist_age >= 0).all() and ((f.hist_event >= 0) & (f.hist_event <= len(EVENT_TYPES))).all()
    if not with_project:
        assert not f.cand_image_mask.any() and not f.hist_image_mask.any()
