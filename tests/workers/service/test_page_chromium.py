"""End to end: the search page in headless Chromium (Debian's, driven by Playwright) against a real uvicorn
server of the service app over the shared test world (LocalEngine, MiniLM, an untrained FusionRanker,
a SQLite history store).

Enter the key, search, see the photos load (fetched with the key, shown via blob URLs), switch the shopper to
a simulated user whose history strongly favours the shoes and see the order change, open a "why" panel, and
see a degraded (fail-open) answer flagged. A screenshot is saved under the test's tmp_path and, when
``TEST_SCREENSHOT_DIR`` is set, there too.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rerank.model.ranker import MODALITIES
from tests.workers.service.browser import CHROMIUM_ARGS, draw_photos, ensure_chromium, live_server
from tests.workers.service.world import API_KEY, PRODUCTS

pytestmark = pytest.mark.slow

#: a simulated shopper whose history strongly favours the shoes (purchases and carts, recent)
FAN = "simulated-shoe-fan"
FAN_PRODUCTS = ("p0", "p10", "p11")
QUERY = "leather"
TIMEOUT_MS = 20_000
#: read at import: tests/conftest.py clears every FUSIONRANK_* variable around each test
SCREENSHOT_DIR = os.environ.get("TEST_SCREENSHOT_DIR")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"Playwright for Python is missing ({e}): pip install -e '.[test]' (never `playwright install`)")
    path = ensure_chromium()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(service_world):
    w = service_world
    draw_photos(w.images_root, PRODUCTS)
    now = datetime.now(timezone.utc)
    events = [{"event_id": f"fan-{i}-{j}", "user_id": FAN, "product_id": p, "type": t, "ts": now - timedelta(minutes=10 * i + j)}
              for i, p in enumerate(FAN_PRODUCTS) for j, t in enumerate(("purchase", "add_to_cart", "click"))]
    assert len(w.store.insert_events(events)) == len(events)
    w.profiles.invalidate(FAN)
    with live_server(w.app()) as url:
        yield url


def _result_ids(page) -> list[str]:
    return page.eval_on_selector_all("[data-testid=result]", "els => els.map(e => e.dataset.productId)")


def _wait_results(page, user_id: str) -> None:
    page.wait_for_selector(f"#results[data-state=done][data-user-id='{user_id}'][data-query='{QUERY}']:not([aria-busy])",
                           state="attached", timeout=TIMEOUT_MS)


def _wait_photos(page) -> int:
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('[data-testid=photo]')];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        timeout=TIMEOUT_MS,
    )
    return page.eval_on_selector_all(
        "[data-testid=photo]", "imgs => imgs.filter(i => i.src.startsWith('blob:') && i.naturalWidth === 224).length")


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    stable = SCREENSHOT_DIR
    if stable:
        Path(stable).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(stable) / name)
        print(f"screenshot: {Path(stable) / name}")
    print(f"screenshot: {shot}")
    return shot


def test_search_page_end_to_end(browser, site, tmp_path):
    t0 = time.perf_counter()
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 and r.status != 401 else None)
    page.goto(site + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.is_hidden("[data-testid=image-preview]") and page.is_hidden("[data-testid=degraded]")

    # a wrong key: the page says so (the server answered 401)
    page.fill("[data-testid=api-key]", "not-the-key")
    page.click("[data-testid=save-key]")
    page.wait_for_selector("[data-testid=status].error", timeout=TIMEOUT_MS)
    assert "API key missing or wrong" in page.inner_text("[data-testid=status]")

    # the right key: the shoppers with history load, most events first
    page.fill("[data-testid=api-key]", API_KEY)
    page.click("[data-testid=save-key]")
    page.wait_for_selector(f"[data-testid=shopper] option[value='{FAN}']", state="attached", timeout=TIMEOUT_MS)
    options = page.eval_on_selector_all("[data-testid=shopper] option", "os => os.map(o => o.value)")
    assert options == ["", FAN, "u1"]

    # anonymous search: results with their photos (fetched with the key, shown via blob URLs)
    page.fill("[data-testid=query]", QUERY)
    page.press("[data-testid=query]", "Enter")
    _wait_results(page, "")
    anonymous = _result_ids(page)
    assert len(anonymous) == len(PRODUCTS)  # size 20 >= the 12 products: every one comes back
    assert _wait_photos(page) == len(anonymous)
    moves = page.eval_on_selector_all("[data-testid=result]", "els => els.map(e => [+e.dataset.previousRank, +e.dataset.rank])")
    assert [r for _, r in moves] == list(range(1, len(moves) + 1))
    assert sorted(p for p, _ in moves) == list(range(1, len(moves) + 1))
    first = page.locator("[data-testid=result]").first
    assert first.locator("[data-testid=rank-move]").inner_text().replace("\n", " ").startswith(f"#{moves[0][0]} → #1")
    assert page.is_hidden("[data-testid=degraded]")

    # the shoe fan: the same query, reordered by the history
    with page.expect_request(lambda r: r.url.endswith("/search")) as req:
        page.select_option("[data-testid=shopper]", FAN)
    assert req.value.post_data_json["user_id"] == FAN and req.value.headers["x-api-key"] == API_KEY
    _wait_results(page, FAN)
    personal = _result_ids(page)
    assert sorted(personal) == sorted(anonymous)
    assert personal != anonymous, f"the shopper's history did not change the order: {personal}"
    _wait_photos(page)

    # "why" for the top result: gates of every modality, the attended history items, the first-stage lists
    top = page.locator("[data-testid=result]").first
    assert top.locator("[data-testid=why-panel]").is_hidden()
    top.locator("[data-testid=why-button]").click()
    panel = top.locator("[data-testid=why-panel]")
    panel.wait_for(state="visible")
    assert top.locator("[data-testid=why-button]").get_attribute("aria-expanded") == "true"
    gates = panel.locator("[data-testid=why-gates] li").evaluate_all("ls => ls.map(l => l.dataset.modality)")
    assert gates == list(MODALITIES)
    history = panel.locator("[data-testid=why-history] li").evaluate_all("ls => ls.map(l => l.dataset.productId)")
    assert history and set(history) <= set(FAN_PRODUCTS)
    lists = panel.locator("[data-testid=why-first-stage] tbody tr").evaluate_all("rs => rs.map(r => r.dataset.list)")
    assert lists and set(lists) <= {"bm25", "knn_text", "knn_image"}
    _screenshot(page, tmp_path, "search-page.png")

    # visual search: the chosen photo goes to /search as base64 in `image`
    png = _draw_png(tmp_path / "query.png")
    with page.expect_request(lambda r: r.url.endswith("/search")) as req:
        page.set_input_files("[data-testid=image]", str(png))
        page.wait_for_selector("[data-testid=image-preview]:not([hidden])")
        page.click("[data-testid=search-button]")
    assert base64.b64decode(req.value.post_data_json["image"]) == png.read_bytes()
    page.wait_for_selector("#results[data-state=done]:not([aria-busy])", state="attached")
    page.click("[data-testid=clear-image]")
    assert page.is_hidden("[data-testid=image-preview]")
    with page.expect_request(lambda r: r.url.endswith("/search")) as req:
        page.click("[data-testid=search-button]")
    assert "image" not in req.value.post_data_json
    _wait_results(page, FAN)

    # the key was kept: a reload fills it in again
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("[data-testid=api-key]") == API_KEY
    assert not errors, errors
    ctx.close()
    elapsed = time.perf_counter() - t0
    print(f"search page end to end: {elapsed:.1f} s")


def _draw_png(path: Path) -> Path:
    from indexing.synthetic import COLOURS, draw_product

    draw_product("shoe", COLOURS["Black"], random.Random(1)).save(path)
    return path


def test_degraded_answer_is_flagged(browser, service_world, tmp_path):
    from rerank.reranker import Reranker

    w = service_world
    late = Reranker(w.engine, w.index, w.artifact, text_encoder=w.text, history=w.profiles, budget_ms=1e-6)  # always over budget
    with live_server(w.app(reranker=late)) as url:
        ctx = browser.new_context(viewport={"width": 1360, "height": 900})
        page = ctx.new_page()
        page.add_init_script(f"localStorage.setItem('fusionrank.apiKey', {API_KEY!r})")
        page.goto(url + "/")
        page.fill("[data-testid=query]", QUERY)
        page.click("[data-testid=search-button]")
        page.wait_for_selector("[data-testid=degraded]:not([hidden])", timeout=TIMEOUT_MS)
        assert "timeout" in page.inner_text("[data-testid=degraded]")
        moves = page.eval_on_selector_all("[data-testid=result]", "els => els.map(e => [e.dataset.previousRank, e.dataset.rank])")
        assert moves and all(p == r for p, r in moves)  # failed open: the first-stage order
        ctx.close()


def _open_page(browser, url: str):
    """``(context, page)``: the search page at ``url`` with the API key stored, ready, the test query typed."""
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    page.add_init_script(f"localStorage.setItem('fusionrank.apiKey', {API_KEY!r})")
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']")
    page.fill("[data-testid=query]", QUERY)
    return ctx, page


def test_diversity_control_sends_the_lambda_and_shows_which_applied(browser, site, tmp_path):
    ctx, page = _open_page(browser, site)
    with page.expect_request(lambda r: r.url.endswith("/search")) as req:
        page.press("[data-testid=query]", "Enter")
    assert "diversity" not in req.value.post_data_json  # the index's default
    _wait_results(page, "")
    assert page.inner_text("[data-testid=diversity-note]").startswith("diversity λ 0.000")
    with page.expect_request(lambda r: r.url.endswith("/search")) as req:
        page.select_option("[data-testid=diversity]", "0.5")
    assert req.value.post_data_json["diversity"] == 0.5
    page.wait_for_selector("#results[data-diversity='0.5'][data-state=done]:not([aria-busy])", state="attached", timeout=TIMEOUT_MS)
    assert "lambda 0.5 as requested" in page.inner_text("[data-testid=diversity-note]")
    top = page.locator("[data-testid=result]").nth(1)
    top.locator("[data-testid=why-button]").click()
    why = top.locator("[data-testid=why-diversity]")
    why.wait_for(state="visible")
    assert why.inner_text().startswith("λ 0.500: #") and "by relevance" in why.inner_text()
    with page.expect_request(lambda r: r.url.endswith("/search")) as req:
        page.select_option("[data-testid=diversity]", "auto")
    assert req.value.post_data_json["diversity"] == "auto"
    page.wait_for_selector("#results[data-state=done]:not([aria-busy])", state="attached", timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.querySelector('[data-testid=diversity-note]').textContent.includes('auto:')", timeout=TIMEOUT_MS)
    ctx.close()


def test_the_page_sends_ubi_impressions_and_clicks_with_the_served_query_id(browser, site, service_world):
    """As a shop's page: impressions of the rendered results and a click on a product go to POST /events with the
    query_id of the /search answer; the store joins them to what the service recorded it served."""
    from rerank.datasets import clicks as C

    ctx, page = _open_page(browser, site)
    with page.expect_response(lambda r: r.url.endswith("/events")) as impressions:
        with page.expect_response(lambda r: r.url.endswith("/search")) as answer:
            page.press("[data-testid=query]", "Enter")
    qid = answer.value.json()["query_id"]
    sent = impressions.value.request.post_data_json["events"]
    shown = _result_ids(page)
    assert [e["action_name"] for e in sent] == ["impression"] * len(shown)
    assert [e["event_attributes"]["object"]["object_id"] for e in sent] == shown
    assert [e["event_attributes"]["position"]["ordinal"] for e in sent] == list(range(1, len(shown) + 1))
    assert {e["query_id"] for e in sent} == {qid} and impressions.value.json()["rejected"] == 0
    client = sent[0]["client_id"]
    assert client.startswith("page-") and answer.value.request.post_data_json["client_id"] == client

    third = page.locator("[data-testid=result]").nth(2)
    with page.expect_response(lambda r: r.url.endswith("/events")) as click:
        third.locator("[data-testid=product-link]").click()
    ev = click.value.request.post_data_json["events"]
    assert [(e["action_name"], e["query_id"], e["event_attributes"]["position"]["ordinal"], e["event_attributes"]["object"]["object_id"])
            for e in ev] == [("click", qid, 3, shown[2])]
    assert click.value.json()["stored"] == 1 and third.get_attribute("data-clicked") == "1"
    ctx.close()

    state = None
    for _ in range(100):  # the service writes what it served off the request path
        sessions, _ = C.sessions_from_log(*service_world.store.ubi_log())
        state = [s for s in sessions if s.query_id == qid]
        if state:
            break
        time.sleep(0.05)
    assert state and state[0].shown[: len(shown)] == tuple(shown) and state[0].clicks == frozenset({2}) and state[0].client == client


#: products whose colour the catalog of the photo world withholds (the title's colour word removed, as in the fashion
#: benchmark) and what the photo head read: (id, title without the colour, photo colour, confidence)
WITHHELD = [("p0", "running shoes for men", "Black", 0.93), ("p11", "sneakers casual shoes", "White", 0.88),
            ("p10", "leather shoes formal", "Black", 0.55)]
PHOTO_INDEX = "products-photo"


@pytest.fixture(scope="module")
def photo_site(service_world, site):
    """The world's products in a products-v4 index, three with their colour withheld from the catalog and the photo's
    reading stored as indexing writes it (:func:`indexing.photo_attributes.attribute_document_fields`, threshold 0.8):
    two completed, one (0.55) not; served by the same model."""
    from indexing import fields as F
    from indexing.engines.base import BulkAction
    from indexing.photo_attributes import Prediction, attribute_document_fields
    from mappings import load_mapping
    from rerank.reranker import Reranker
    from tests.workers.service.world import IMAGE_DIM

    w = service_world
    w.engine.create_index(PHOTO_INDEX, load_mapping("products-v4", text_dim=w.text.dim, image_dim=IMAGE_DIM))
    docs = {d[F.ID]: dict(d) for d in w.engine.iter_documents(w.index)}
    titles = [t for _, t, _, _ in WITHHELD]
    for (pid, title, colour, conf), vec in zip(WITHHELD, w.text.encode(titles)):
        docs[pid].update({F.TITLE: title, F.COLOUR: "", F.TEXT_VEC: vec.tolist()})
        docs[pid]["_photo"] = {"colour": Prediction(colour, conf)}
    actions = []
    for pid, d in docs.items():
        preds = d.pop("_photo", None)
        d.update(attribute_document_fields(d, preds, "photo-attributes:page-test" if preds else None))
        actions.append(BulkAction.index(pid, d))
    assert w.engine.bulk(PHOTO_INDEX, actions).ok
    w.engine.refresh(PHOTO_INDEX)
    reranker = Reranker(w.engine, PHOTO_INDEX, w.artifact, text_encoder=w.text, history=w.profiles, budget_ms=10_000)
    with live_server(w.app(reranker=reranker, index_alias=PHOTO_INDEX)) as url:
        yield url
    w.engine.delete_index(PHOTO_INDEX)


def test_the_page_marks_the_attributes_read_from_the_photo(browser, photo_site, tmp_path):
    ctx, page = _open_page(browser, photo_site)
    page.press("[data-testid=query]", "Enter")
    _wait_results(page, "")
    _wait_photos(page)
    chips = page.eval_on_selector_all(
        "[data-testid=result]",
        "els => Object.fromEntries(els.map(e => [e.dataset.productId, [...e.querySelectorAll('[data-testid=attributes] .attr')]"
        ".map(c => [c.dataset.attribute, c.dataset.source, c.textContent])]))")
    assert len(chips) == len(PRODUCTS)
    for pid, _title, art, colour, gender, _price in PRODUCTS:
        got = {a: (src, text) for a, src, text in chips[pid]}
        assert got["article_type"] == ("catalog", art) and got["gender"] == ("catalog", gender)
        withheld = {p: (c, conf) for p, _, c, conf in WITHHELD}
        if pid not in withheld:
            assert got["colour"] == ("catalog", colour)
        elif withheld[pid][1] >= 0.8:  # completed: shown, marked as the photo's, with its confidence
            assert got["colour"] == ("photo", f"{withheld[pid][0]} from photo {round(withheld[pid][1] * 100)}%")
        else:  # read, but below the completion threshold: not shown as the product's colour
            assert "colour" not in got
    marked = page.locator("[data-testid=result][data-product-id=p0] .attr.from-photo")
    assert "read from the photo" in marked.get_attribute("title") and marked.get_attribute("aria-label") == "colour Black, read from the photo"
    _screenshot(page, tmp_path, "search-page-photo-attributes.png")
    ctx.close()
