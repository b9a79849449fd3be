"""The service's process edge, without a model: JSON rendering (orjson and the stdlib agree), TCP_NODELAY on the
sockets of ``fusionrank serve --workers N``, the serve options, the model endpoints' thread slots, and the ``bench serve`` load generator's client."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from workers.service import app as A
from workers.bench.rerank import closed_loop
from workers.bench import serve as B
from workers.commands import serve as S

# ----------------------------------------------------------------------------- JSON rendering
CASES = [
    {"a": 1, "b": [1.5, "x", None, True], "c": {"d": "é ü 漢字 \u2028"}},
    {"score": np.float32(0.1), "n": np.int64(7), "ok": np.bool_(True), "v": np.arange(3, dtype=np.float32), "h": np.float16(1.5)},
    {"m": np.arange(6, dtype=np.float64).reshape(2, 3), "strided": np.arange(6)[::2], "t": (1, 2), "s": {3}},
    {1: "int key", 2.5: "float key", None: "none key", False: "bool key"},
    {"big": 2**70, "neg": -(2**65)},
]
NON_FINITE = [
    {"x": float("nan"), "y": [float("inf"), -float("inf")], "z": {"w": np.float32("nan")}, "fine": 1.25},
    {"arr": np.array([1.0, np.nan, np.inf]), "t": (float("nan"),)},
]


def _stdlib_reference(content):
    """The pre-orjson rendering of FastJSON (the semantics to keep)."""
    try:
        s = json.dumps(content, default=A._plain, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        s = json.dumps(A._finite(json.loads(json.dumps(content, default=A._plain))), allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return s.encode("utf-8")


@pytest.mark.parametrize("content", CASES + NON_FINITE)
def test_dumps_gives_the_stdlib_values(content):
    out = A.dumps(content)
    assert isinstance(out, bytes)
    assert json.loads(out) == json.loads(_stdlib_reference(content))
    assert A.FastJSON(content).body == out


@pytest.mark.parametrize("content", NON_FINITE)
def test_non_finite_floats_become_null(content):
    text = A.dumps(content).decode("utf-8")
    assert "NaN" not in text and "Infinity" not in text and "null" in text
    assert json.loads(text)  # strict JSON


def test_numpy_float32_keeps_its_python_value_and_text_is_utf8():
    out = A.dumps({"s": np.float32(0.1), "t": "漢字"})
    assert json.loads(out)["s"] == float(np.float32(0.1))  # .item(), as with the stdlib (not orjson's float32 shortcut)
    assert "漢字".encode("utf-8") in out  # not \u-escaped


def test_dumps_without_orjson(monkeypatch):
    monkeypatch.setattr(A, "orjson", None)
    for content in CASES + NON_FINITE:
        assert A.dumps(content) == _stdlib_reference(content)


def test_unserializable_is_still_an_error():
    with pytest.raises(TypeError):
        A.dumps({"x": object()})


# ----------------------------------------------------------------------------- TCP_NODELAY (serve --workers N)
def _transport_nodelay(listener: socket.socket) -> int:
    """TCP_NODELAY of a connection accepted by an asyncio server on ``listener`` (what a uvicorn worker does)."""
    async def main() -> int:
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        class P(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                got.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(P, sock=listener)
        port = listener.getsockname()[1]
        _, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            w.close()
            server.close()

    return asyncio.run(main())


def _uvicorn_style_listener() -> socket.socket:
    sock = socket.socket(family=socket.AF_INET)  # as uvicorn's Config.bind_socket: the object's proto is 0
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_tcp_nodelay_listener_gives_nodelay_connections():
    sock = S.tcp_nodelay(_uvicorn_style_listener())
    assert sock.proto == socket.IPPROTO_TCP
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    sock.listen(8)
    assert _transport_nodelay(sock) == 1


def test_tcp_nodelay_leaves_other_sockets_alone():
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert S.tcp_nodelay(a) is a
    finally:
        a.close()
        b.close()


def test_serve_passes_loop_http_and_access_log(monkeypatch):
    from typer.testing import CliRunner

    from workers.cli import app

    seen = {}
    monkeypatch.setenv("FUSIONRANK_API_KEY", "k" * 24)
    monkeypatch.setenv(S.NO_AUTH_ENV, "0")  # serve sets it for its workers; restored afterwards
    monkeypatch.setattr(S, "run_workers", lambda config: seen.setdefault("config", config))
    r = CliRunner().invoke(app, ["serve", "--port", "0", "--workers", "2", "--loop", "asyncio", "--http", "h11", "--no-access-log"])
    assert r.exit_code == 0, r.output
    cfg = seen["config"]
    assert (cfg.workers, cfg.loop, cfg.http, cfg.access_log) == (2, "asyncio", "h11", False)
    assert cfg.factory and cfg.app == "workers.commands.serve:app_factory"


# ----------------------------------------------------------------------------- the load generator's client
class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list = []
    ports: list = []
    close_every = 0

    def do_POST(self):  # noqa: N802
        n = int(self.headers["Content-Length"])
        body = self.rfile.read(n)
        type(self).seen.append((self.path, self.headers.get("X-API-Key"), self.headers.get("Content-Type"), body))
        type(self).ports.append(self.client_address[1])
        k = len(type(self).seen)
        degraded = "timeout" if k % 3 == 0 else None
        out = json.dumps({"hits": {"hits": []}, "fusionrank": {"degraded": degraded}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        if self.close_every and k % self.close_every == 0:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("close_every", [0, 4])
def test_level_sends_the_same_bodies_and_counts(close_every):
    handler = type("H", (_Recorder,), {"seen": [], "ports": [], "close_every": close_every})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        bodies = [{"query": f"q{i} é", "response": {"hits": {"hits": [{"_id": str(i), "_score": 1.5}]}}, "user_id": None} for i in range(10)]
        payloads = B.encode_bodies(bodies)
        out = B._level(f"http://127.0.0.1:{server.server_address[1]}", payloads, 3, {"X-API-Key": "secret"})
    finally:
        server.shutdown()
        server.server_close()
    warm = max(2 * 3, 4)
    assert out["requests"] == 10 and out["errors"] == 0 and out["rps"] > 0
    assert 0 < out["p50_ms"] <= out["p99_ms"]
    assert len(handler.seen) == warm + 10
    assert all(p == "/rerank" and k == "secret" and ct == "application/json" for p, k, ct, _ in handler.seen)
    # what httpx's json= sent: compact UTF-8 JSON of the same bodies
    assert sorted(b for *_, b in handler.seen[warm:]) == sorted(
        json.dumps(b, ensure_ascii=False, separators=(",", ":")).encode("utf-8") for b in bodies)
    assert 0 < out["degraded"] < 10
    if not close_every:  # each client thread keeps its one keep-alive connection from the warm-up to the end
        assert len(set(handler.ports)) == 3
    else:  # a response with Connection: close makes that thread open a new one
        assert len(set(handler.ports)) > 3


def test_closed_loop_order_warm_up_and_concurrency():
    lock = threading.Lock()
    state = {"in_flight": 0, "most": 0}
    log, names = [], set()

    def send(item):
        with lock:
            state["in_flight"] += 1
            state["most"] = max(state["most"], state["in_flight"])
            log.append(item)
            names.add(threading.current_thread().name)
        time.sleep(0.002)
        with lock:
            state["in_flight"] -= 1
        return item * 10

    warm = [-1, -2, -3, -4, -5, -6]
    items = list(range(40))
    res, wall = closed_loop(4, send, items, warm_up=warm)
    assert res == [i * 10 for i in items]  # in the items' order, each sent once
    assert sorted(log[: len(warm)]) == sorted(warm) and sorted(log[len(warm):]) == items  # the warm-up first, untimed
    assert state["most"] == 4  # never more than c in flight, and c were
    assert len(names) == 4
    assert wall >= 40 / 4 * 0.002  # at least each thread's share of the timed items


def test_closed_loop_stops_at_the_first_failure():
    sent = []

    def send(item):
        sent.append(item)
        if item == 3:
            raise ConnectionRefusedError("server gone")
        time.sleep(0.001)
        return item

    with pytest.raises(ConnectionRefusedError, match="server gone"):
        closed_loop(2, send, list(range(200)))
    assert len(sent) < 20  # the other thread stopped too
    with pytest.raises(ValueError, match="at least one thread"):
        closed_loop(0, send, [1])


def test_encode_bodies_refuses_nan():
    with pytest.raises(ValueError):
        B.encode_bodies([{"x": math.nan}])


# ----------------------------------------------------------------------------- the reranker gate
def _wait_until(cond, timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_fifo_gate_admits_in_arrival_order_without_barging():
    from workers.service.state import FifoGate

    gate = FifoGate(1)
    order: list[int] = []
    gate.acquire()  # a call in progress
    threads = []

    def call(k: int) -> None:
        with gate:
            order.append(k)

    for k in range(5):
        t = threading.Thread(target=call, args=(k,))
        t.start()
        threads.append(t)
        _wait_until(lambda: gate.waiting == k + 1)
    gate.release()  # hands the permit to caller 0, not to whoever asks next
    late = threading.Thread(target=call, args=(99,))
    late.start()
    for t in [*threads, late]:
        t.join(10)
    assert order == [0, 1, 2, 3, 4, 99]
    assert gate.waiting == 0


def test_fifo_gate_counts_and_refuses_extra_releases():
    from workers.service.state import FifoGate, ServiceState

    gate = FifoGate(2)
    gate.acquire()
    gate.acquire()
    assert gate.waiting == 0
    gate.release()
    gate.release()
    with pytest.raises(ValueError):
        gate.release()
    with pytest.raises(ValueError):
        FifoGate(0)
    assert isinstance(ServiceState(settings=None).gate, FifoGate)


# ----------------------------------------------------------------------------- the model endpoints' thread slots
class _FakeReranker:
    """What :class:`ServiceState` reads of a reranker, without a model."""

    name = "fake"
    engine = None
    index = "products"
    history = None
    image_encoder = None
    batcher = None
    model = None


class _BlockingReranker(_FakeReranker):
    """Records the queries it is called with; each call waits for a permit (a stand-in for a slow model call)."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.calls: list[str] = []
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def rerank(self, query, response, **kw):
        with self._lock:
            self.calls.append(query)
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        assert self.permits.acquire(timeout=20), "never released"
        with self._lock:
            self.inside -= 1
        return {**response, "fusionrank": {"degraded": None}}


def test_model_endpoints_hold_gate_size_plus_one_threads_and_serve_in_arrival_order():
    import httpx

    from workers.service.state import MODEL_THREAD_SLACK, ServiceState
    from workers.settings import load_settings

    fake = _BlockingReranker()
    st = ServiceState.from_reranker(load_settings(), fake, auth=False)
    app = A.create_app(st)

    async def main():
        async def until(cond):
            for _ in range(2000):
                if cond():
                    return
                await asyncio.sleep(0.005)
            raise AssertionError("timed out")

        def queued():  # requests past validation: in the reranker, parked at the gate, or waiting for a thread slot
            return len(fake.calls) + st.gate.waiting + st.model_limiter().statistics().tasks_waiting

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fusionrank.test") as c:
            tasks = []
            for k in range(6):
                body = {"query": f"q{k}", "response": {"hits": {"hits": [{"_id": "p1", "_score": 1.0}]}}}
                tasks.append(asyncio.create_task(c.post("/rerank", json=body)))
                await until(lambda: queued() == k + 1)  # one at a time: the arrival order is known
            stats = st.model_limiter().statistics()
            # one call in the reranker, one thread parked at the gate, the other four wait on the event loop
            assert stats.total_tokens == st.gate_size + MODEL_THREAD_SLACK == 2
            assert (stats.borrowed_tokens, stats.tasks_waiting) == (2, 4)
            assert (fake.calls, st.gate.waiting) == (["q0"], 1)
            for k in range(6):  # finish the calls one by one: each time the next request in line takes its place
                fake.permits.release()
                entered = min(k + 2, 6)  # and the one after it parked at the gate, while there is one
                await until(lambda: len(fake.calls) == entered and fake.inside == (k < 5) and st.gate.waiting == (entered < 6))
                assert st.model_limiter().statistics().borrowed_tokens <= 2
            return await asyncio.gather(*tasks)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 6
    assert fake.calls == [f"q{k}" for k in range(6)] and fake.most_inside == 1
    assert all(r.json()["fusionrank"]["degraded"] is None for r in responses)


# ----------------------------------------------------------------------------- the GC freeze after loading
def test_load_freezes_the_heap_only_when_asked():
    import gc

    from workers.service.state import ServiceState

    assert gc.get_freeze_count() == 0
    try:
        plain = ServiceState.loading(None, loader=lambda s: _FakeReranker())
        plain.load()
        assert plain.ready and gc.get_freeze_count() == 0  # tests and from_reranker: the GC is left alone
        st = ServiceState.loading(None, loader=lambda s: _FakeReranker(), freeze_gc=True)
        st.load()
        assert st.ready and gc.get_freeze_count() > 0
        first = st.reranker
        st.reload()
        assert st.reranker is not first and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
