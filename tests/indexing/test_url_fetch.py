"""Image URLs cannot reach inside the network (SSRF): real HTTP servers on 127.0.0.2 / 127.0.0.3 are refused
unless the allow-list names their network, a redirect from an allowed host to a refused one is refused before
connecting to it, the address connected to is the one checked (the name is resolved once), and the indexing
job indexes the product without its photo, reporting why."""

from __future__ import annotations

import csv
import ipaddress
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from indexing import url_fetch
from indexing.errors import ConfigError, ImageError, ImageRefusedError
from indexing.images import fetch_image_bytes, load_image
from indexing.url_fetch import UrlPolicy, address_kind

PHOTO = "images/13199.jpg"  # a real catalog photo (ASICS running shoe)


class _Server:
    """A real HTTP server on ``host``: ``/img.jpg`` the photo, ``/to?u=URL`` a 302 to URL, ``/loop`` a 302 to itself."""

    def __init__(self, host: str, body: bytes):
        self.hits: list[tuple[str, str | None]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits.append((self.path, self.headers.get("Host")))
                if self.path.startswith("/to?u="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/to?u="):])
                    self.end_headers()
                elif self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.end_headers()
                elif self.path == "/img.jpg":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), H)
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/img.jpg") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def photo_bytes(shared_data) -> bytes:
    return (shared_data / "fashion" / PHOTO).read_bytes()


@pytest.fixture()
def servers(photo_bytes):
    a, b = _Server("127.0.0.2", photo_bytes), _Server("127.0.0.3", photo_bytes)
    yield a, b
    a.close()
    b.close()


def _fetch(url: str, policy: UrlPolicy | None = None) -> bytes:
    return fetch_image_bytes(url, None, policy=policy, timeout_s=5.0)


def test_a_loopback_server_is_refused_by_default_and_fetched_when_its_network_is_allowed(servers, photo_bytes):
    a, _ = servers
    with pytest.raises(ImageRefusedError, match=r"refused: host '127\.0\.0\.2' is 127\.0\.0\.2, a loopback address"):
        _fetch(a.url())
    assert a.hits == []  # refused before connecting
    assert _fetch(a.url(), UrlPolicy.from_strings(["127.0.0.2/32"])) == photo_bytes
    assert _fetch(a.url(), UrlPolicy.from_strings(["127.0.0.0/8"])) == photo_bytes
    assert len(a.hits) == 2
    # another loopback address than the allowed one stays refused
    with pytest.raises(ImageRefusedError, match="loopback"):
        _fetch(a.url(), UrlPolicy.from_strings(["127.0.0.3"]))
    # the decoded photo comes through the same checked path
    assert load_image(a.url(), None, policy=UrlPolicy.from_strings(["127.0.0.2"])).size == (224, 224)


def test_a_redirect_from_an_allowed_host_to_a_refused_one_is_refused_without_connecting_to_it(servers, photo_bytes):
    a, b = servers
    allow_a = UrlPolicy.from_strings(["127.0.0.2"])
    with pytest.raises(ImageRefusedError, match=r"redirected to http://127\.0\.0\.3:\d+/img\.jpg.*127\.0\.0\.3, a loopback address"):
        _fetch(a.url(f"/to?u={b.url()}"), allow_a)
    assert [p for p, _ in a.hits] == [f"/to?u={b.url()}"] and b.hits == []
    # ... and to the metadata endpoint, or to another scheme
    with pytest.raises(ImageRefusedError, match="cloud metadata"):
        _fetch(a.url("/to?u=http://169.254.169.254/latest/meta-data/"), allow_a)
    with pytest.raises(ImageRefusedError, match="unsupported scheme 'file'"):
        _fetch(a.url("/to?u=file:///etc/passwd"), allow_a)
    # a redirect inside the allowed networks is followed (relative Location too)
    both = UrlPolicy.from_strings(["127.0.0.2", "127.0.0.3"])
    assert _fetch(a.url(f"/to?u={b.url()}"), both) == photo_bytes
    assert _fetch(a.url("/to?u=/img.jpg"), allow_a) == photo_bytes
    with pytest.raises(ImageError, match="more than 5 redirects"):
        _fetch(a.url("/loop"), allow_a)
    assert sum(1 for p, _ in a.hits if p == "/loop") == 6


def test_the_address_connected_to_is_the_one_checked(servers, monkeypatch, photo_bytes):
    """A name resolved once: a resolver that answers 127.0.0.2 then 127.0.0.3 (DNS rebinding) cannot move the
    connection to the refused 127.0.0.3; the request still names the host (Host header)."""
    a, b = servers
    answers = iter(["127.0.0.2", "127.0.0.3", "127.0.0.3"])
    calls = []
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kw):
        if host != "images.shop.test":
            return real(host, port, *args, **kw)
        ip = next(answers)
        calls.append(ip)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(url_fetch.socket, "getaddrinfo", rebinding)
    url = f"http://images.shop.test:{a.port}/img.jpg"
    assert _fetch(url, UrlPolicy.from_strings(["127.0.0.2"])) == photo_bytes
    assert calls == ["127.0.0.2"] and a.hits == [("/img.jpg", f"images.shop.test:{a.port}")] and b.hits == []
    # the next fetch resolves to the refused address and is refused, naming the DNS answer
    with pytest.raises(ImageRefusedError, match=r"host 'images\.shop\.test' resolves to 127\.0\.0\.3, a loopback address"):
        _fetch(url, UrlPolicy.from_strings(["127.0.0.2"]))
    assert b.hits == []


def test_a_name_with_one_refused_answer_among_public_ones_is_refused(monkeypatch):
    def mixed(host, port, *args, **kw):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]

    monkeypatch.setattr(url_fetch.socket, "getaddrinfo", mixed)
    with pytest.raises(ImageRefusedError, match=r"resolves to 10\.0\.0\.5, a private address"):
        _fetch("http://cdn.example.test/a.jpg")


@pytest.mark.parametrize("url", [
    "http://localhost:9/x.jpg",  # DNS answer (hosts file) -> loopback
    "http://2130706433:9/x.jpg",  # 127.0.0.1 as one decimal number
    "http://0x7f000001:9/x.jpg",  # ... in hex
    "http://127.1:9/x.jpg",  # ... shortened
    "http://[::1]:9/x.jpg",
    "http://[::ffff:127.0.0.1]:9/x.jpg",  # IPv4-mapped IPv6
    "http://0.0.0.0:9/x.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/x.jpg",
    "http://192.168.1.1/x.jpg",
    "http://172.16.0.1/x.jpg",
    "http://[fe80::1]/x.jpg",
    "http://[fd00:ec2::254]/x.jpg",
    "http://100.64.0.1/x.jpg",
])
def test_internal_addresses_in_any_spelling_are_refused(url):
    with pytest.raises(ImageRefusedError, match=r"refused: host .* (is|resolves to) .*, a .* address"):
        _fetch(url)


def test_address_kinds_and_the_allow_list():
    ip = ipaddress.ip_address
    assert address_kind(ip("93.184.216.34")) is None and address_kind(ip("2606:4700::1111")) is None
    assert address_kind(ip("127.0.0.2")) == "loopback"
    assert address_kind(ip("10.0.0.1")) == "private" and address_kind(ip("fc00::1")) == "private"
    assert address_kind(ip("169.254.1.1")) == "link-local" and address_kind(ip("fe80::1")) == "link-local"
    assert address_kind(ip("169.254.169.254")) == "cloud metadata" and address_kind(ip("::ffff:169.254.169.254")) == "cloud metadata"
    assert address_kind(ip("64:ff9b::a00:1")) == "private"  # NAT64 of 10.0.0.1
    assert address_kind(ip("224.0.0.1")) == "multicast"
    # a broad allowed range does not sweep in the metadata endpoint; naming it on its own does
    broad = UrlPolicy.from_strings(["169.254.0.0/16"])
    assert broad.refusal(ip("169.254.1.1")) is None and broad.refusal(ip("169.254.169.254")) == "cloud metadata"
    assert UrlPolicy.from_strings(["169.254.169.254/32"]).refusal(ip("169.254.169.254")) is None
    assert UrlPolicy.from_strings(["10.0.0.0/8"]).refusal(ip("::ffff:10.1.1.1")) is None
    for bad in ("10.0.0.1/8", "not-a-net", "10.0.0.0/33"):
        with pytest.raises(ConfigError, match="allow-list entry"):
            UrlPolicy.from_strings([bad])


def test_the_setting_parses_lists_and_refuses_bad_entries(monkeypatch):
    from workers.settings import load_settings

    monkeypatch.setenv("FUSIONRANK_IMAGE_URL_ALLOW_NETWORKS", "127.0.0.2, 10.20.0.0/16")
    assert load_settings().image_url_allow_networks == ["127.0.0.2/32", "10.20.0.0/16"]
    monkeypatch.setenv("FUSIONRANK_IMAGE_URL_ALLOW_NETWORKS", '["fd12::/64"]')
    assert load_settings().image_url_allow_networks == ["fd12::/64"]
    monkeypatch.setenv("FUSIONRANK_IMAGE_URL_ALLOW_NETWORKS", "10.0.0.1/8")
    with pytest.raises(ConfigError, match=r"FUSIONRANK_IMAGE_URL_ALLOW_NETWORKS.*'10\.0\.0\.1/8'.*host bits set"):
        load_settings()


@pytest.mark.slow
def test_the_indexing_job_indexes_a_product_with_a_refused_photo_url_without_its_photo(servers, shared_data, tmp_path):
    from indexing import fields as F
    from indexing.pipeline import IndexJob
    from workers.composition import build_engine
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    a, b = servers
    src = shared_data / "fashion" / "bench" / "catalog.csv"
    with src.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = [r for _, r in zip(range(4), (r for r in reader if r["image"]))]
    (tmp_path / "images").mkdir()
    for r in rows[:2]:
        shutil.copy(shared_data / "fashion" / r["image"], tmp_path / r["image"])
    rows[2]["image"] = a.url()  # the shop's own image host (allowed in the second run)
    rows[3]["image"] = a.url(f"/to?u={b.url()}")  # redirected to a host never allowed
    cat = tmp_path / "catalog.csv"
    with cat.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    settings = load_settings(data_dir=tmp_path / "data")
    engine = build_engine(settings)
    job = IndexJob(catalog=str(cat), index="products", images_root=str(tmp_path), device="cpu", batch_size=8)
    s = run_index_job(engine, settings, job, progress=False)
    assert (s.indexed, s.failed) == (4, 0)
    d = s.to_dict()
    assert d["photos_dropped"] == 2 and d["photo_drop_reasons"] == {"image refused": 2}
    reasons = {e["id"]: e["reason"] for e in d["photo_errors"]}
    assert all("is 127.0.0.2, a loopback address" in reasons[r["product_id"]] for r in rows[2:])
    docs = {x[F.ID]: x for x in engine.iter_documents("products")}
    assert [docs[r["product_id"]][F.HAS_IMAGE] for r in rows] == [True, True, False, False]
    assert not a.hits and not b.hits  # refused before any request
    # the shop allows its image host: the photo behind the direct URL is read now (the product re-indexed), the
    # redirect to the other host stays refused
    allowed = IndexJob(**{**job.to_dict(), "image_allow_networks": ("127.0.0.2/32",)})
    s2 = run_index_job(engine, settings, allowed, progress=False)
    assert (s2.indexed, s2.unchanged, s2.failed, len(s2.photos_dropped)) == (1, 3, 0, 1)
    (e,) = s2.photos_dropped
    assert e.id == rows[3]["product_id"] and "redirected to" in e.reason and "127.0.0.3, a loopback address" in e.reason
    docs = {x[F.ID]: x for x in engine.iter_documents("products")}
    assert [docs[r["product_id"]][F.HAS_IMAGE] for r in rows] == [True, True, True, False]
    assert b.hits == []
    engine.close()
