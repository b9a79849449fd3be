"""The search page's endpoints over the real service app (no browser): the static page, ``GET /v1/users``
and ``GET /v1/products/{id}/image`` (key, confinement to the images root)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

from indexing import fields as F
from indexing.engines.base import BulkAction
from tests.workers.service.world import API_KEY, U1_EVENTS

pytestmark = pytest.mark.slow  # builds the MiniLM world

KEY = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def client(service_world, tmp_path_factory):
    from fastapi.testclient import TestClient

    w = service_world
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes((w.images_root / "images" / "p0.png").read_bytes())
    (w.images_root / "images" / "link.png").symlink_to(outside)
    odd = {  # product id -> its image reference
        "x-dotdot": "../" + outside.parent.name + "/secret.png",
        "x-absolute": str(outside),
        "x-symlink": "images/link.png",
        "x-not-image": "history.sqlite3",
        "x-missing-file": "images/nope.png",
        "x-url": "https://example.com/a.jpg",
        "x-none": None,
    }
    vec = w.engine.get(w.index, ["p0"], fields=[F.TEXT_VEC])["p0"][F.TEXT_VEC]
    actions = [BulkAction.index(pid, {F.ID: pid, F.TITLE: f"odd product {pid}", F.TEXT_VEC: vec,
                                      **({F.IMAGE: ref} if ref is not None else {})}) for pid, ref in odd.items()]
    assert w.engine.bulk(w.index, actions).ok
    w.engine.refresh(w.index)
    now = datetime.now(timezone.utc)
    w.store.insert_events([
        {"event_id": f"page-{u}-{i}", "user_id": u, "product_id": "p1", "type": "view", "ts": now - timedelta(minutes=i + 1)}
        for u, n in (("simulated-busy", 5), ("simulated-a", 1), ("simulated-b", 1)) for i in range(n)
    ])
    with TestClient(w.app()) as c:
        yield c


def test_page_and_static_files_need_no_key_and_nothing_outside_static(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="query"' in r.text and 'src="/static/app.js"' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "X-API-Key" in js.text
    assert client.get("/static/app.css").headers["content-type"].startswith("text/css")
    for bad in ("/static/page.py", "/static/..%2Fpage.py", "/static/%2E%2E%2Fauth.py", "/static/nothing.js"):
        r = client.get(bad)
        assert r.status_code == 404, bad
        assert "def " not in r.text


def test_users_lists_history_users_by_event_count_and_needs_the_key(client):
    r = client.get("/v1/users")
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    assert client.get("/v1/users", headers={"X-API-Key": "wrong"}).status_code == 401
    users = client.get("/v1/users", headers=KEY).json()["users"]
    assert users[:2] == [{"user_id": "simulated-busy", "events": 5}, {"user_id": "u1", "events": len(U1_EVENTS)}]
    assert users[2:] == [{"user_id": "simulated-a", "events": 1}, {"user_id": "simulated-b", "events": 1}]  # ties by id
    assert client.get("/v1/users?limit=1", headers=KEY).json()["users"] == users[:1]
    for bad in ("0", "100000", "x"):
        r = client.get(f"/v1/users?limit={bad}", headers=KEY)
        assert r.status_code == 422 and "limit" in r.json()["detail"]


def test_product_image_is_served_from_the_images_root_only(client, service_world):
    r = client.get("/v1/products/p3/image", headers=KEY)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (service_world.images_root / "images" / "p3.png").read_bytes()
    assert client.get("/v1/products/p3/image").status_code == 401
    for pid in ("x-dotdot", "x-absolute", "x-symlink", "x-not-image"):
        r = client.get(f"/v1/products/{pid}/image", headers=KEY)
        assert r.status_code == 403, pid
        assert "refused" in r.json()["detail"] and not r.content.startswith(b"\x89PNG")
    for pid, word in (("x-missing-file", "missing"), ("x-url", "URL"), ("x-none", "no image"), ("no-such-product", "no product")):
        r = client.get(f"/v1/products/{pid}/image", headers=KEY)
        assert r.status_code == 404 and word in r.json()["detail"], (pid, r.text)


def test_resolve_under_refuses_escapes(tmp_path):
    from workers.service.page import resolve_under

    (tmp_path / "a").mkdir()
    assert resolve_under(tmp_path, "a/b.png") == (tmp_path / "a" / "b.png").resolve()
    for ref in ("../x.png", "a/../../x.png", "/etc/passwd", ".", ""):
        assert resolve_under(tmp_path, ref) is None, ref
    os.symlink("/etc", tmp_path / "etc-link")
    assert resolve_under(tmp_path, "etc-link/passwd") is None
