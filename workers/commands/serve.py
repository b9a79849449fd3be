"""``fusionrank serve`` (the HTTP rerank service, uvicorn) and ``fusionrank bench serve`` (its loopback load test).

The model, encoders, engine and history store are loaded once per process at start-up, in the background:
``/healthz`` answers at once, ``/readyz`` turns 200 when loading is done. A load failure stops the server
(exit status 1) with the reason.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Optional

import typer

from workers.commands import bench_engine_option as engine_opt

log = logging.getLogger(__name__)
NO_AUTH_ENV = "FUSIONRANK_SERVE_NO_AUTH"
IMAGES_ROOT_ENV = "FUSIONRANK_SERVE_IMAGES_ROOT"
SWITCH_INTERVAL_ENV = "FUSIONRANK_SERVE_SWITCH_INTERVAL_MS"
#: the interpreter's thread switch interval in a server process, ms (Python's own default: 5)
DEFAULT_SWITCH_INTERVAL_MS = 1.0


def switch_interval_ms() -> float:
    """The ``serve_switch_interval_ms`` setting (``FUSIONRANK_SERVE_SWITCH_INTERVAL_MS``, 0.01 to 1000 ms, default
    :data:`DEFAULT_SWITCH_INTERVAL_MS`); anything else is a :class:`~indexing.errors.ConfigError` naming the variable."""
    from workers.settings import load_settings

    return load_settings().serve_switch_interval_ms


def setup_server_process(threads: int) -> None:
    """What every server process does before it loads a model: cap its compute threads (worker processes inherit
    ``OMP_NUM_THREADS``; numpy and onnxruntime read it at load) and shorten the interpreter's thread switch interval.

    Why the switch interval: a server process runs several Python threads (the event loop, the endpoint's thread,
    the query-encoding thread). A thread that wants the GIL while another computes in Python waits for the holder to
    release it, up to the switch interval (5 ms by default), so a request parsed on the loop or a query handed to
    the encoder sat waiting behind feature code. Measured with ``bench serve --synthetic --server-workers 2`` at
    concurrency 8 (docs/service.md, *bench serve*)."""
    import sys

    from indexing.encoders import limit_threads

    limit_threads(threads)
    sys.setswitchinterval(switch_interval_ms() / 1000.0)


def app_factory():
    """``uvicorn --factory workers.commands.serve:app_factory``: settings from the environment. For several worker
    processes prefer ``fusionrank serve --workers N`` (:func:`run_workers`): plain ``uvicorn --workers N`` leaves
    Nagle's algorithm on in the workers' connections (see :func:`tcp_nodelay`), ~40 ms on every response."""
    from workers.service.app import create_app
    from workers.service.state import ServiceState
    from workers.settings import load_settings

    from indexing.encoders import threads_from_env
    from workers.settings import apply_process_settings

    setup_server_process(threads_from_env())
    settings = load_settings()
    apply_process_settings(settings)
    state = ServiceState.loading(settings, auth=not settings.serve_no_auth, images_root=settings.serve_images_root, freeze_gc=True)
    state.watch_model = True  # follow `fusionrank model promote | rollback` and the retrain task's promotions
    from workers.service.balance import from_settings

    return create_app(state, balancer=from_settings(settings))  # fusionrank serve --workers N: even out keep-alive connections


def tcp_nodelay(sock: socket.socket) -> socket.socket:
    """``sock`` (a listening TCP socket) such that every connection accepted from it has ``TCP_NODELAY`` set.

    uvicorn's ``--workers N`` binds the socket in the supervisor as ``socket.socket(AF_INET)``, so the socket
    object's ``proto`` is 0, and so is that of every socket the workers accept from it; asyncio sets
    ``TCP_NODELAY`` on a transport's socket only when ``proto == IPPROTO_TCP``, so the workers' connections kept
    Nagle's algorithm on. A response goes out as two writes (headers, then the body): the body waited for the
    client's delayed ACK of the headers, ~40 ms on Linux, on every request (``bench serve --server-workers 2``:
    c=1 p50 ~80 ms for a ~25 ms request; a trivial app: 1.4 ms with one worker, 44 ms with two). uvloop sets
    ``TCP_NODELAY`` on its own, the asyncio loop does not. The returned socket (same file descriptor) says
    ``IPPROTO_TCP`` and the listener carries ``TCP_NODELAY`` (Linux copies it to accepted sockets)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return sock
    out = socket.socket(sock.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=sock.detach())
    out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return out


def run_workers(config: Any) -> None:
    """``uvicorn.run`` for ``config.workers > 1`` (an import-string app), with :func:`tcp_nodelay` on the socket."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    sock = tcp_nodelay(config.bind_socket())
    try:
        if "target" in inspect.signature(Multiprocess).parameters:  # older uvicorn: the worker target is given
            Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock]).run()
        else:
            Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
        port: int = typer.Option(8000, "--port", min=0, max=65535),
        no_auth: bool = typer.Option(False, "--no-auth", help="Serve without API keys: local development only."),
        workers: int = typer.Option(1, "--workers", min=1, max=64, help="uvicorn worker processes (each loads its own model)."),
        images_root: Optional[Path] = typer.Option(None, "--images-root", help="Folder the products' image paths are relative to (default: the fashion data folder)."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical | error | warning | info | debug."),
        access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="uvicorn's access log (one line per request)."),
        loop: str = typer.Option("auto", "--loop", help="uvicorn event loop: auto (uvloop when installed) | asyncio | uvloop."),
        http: str = typer.Option("auto", "--http", help="uvicorn HTTP/1.1 parser: auto (httptools when installed) | h11 | httptools."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Compute threads per worker process (torch, numpy BLAS, "
                                              "onnxruntime); default: OMP_NUM_THREADS when set, else 1."),
        balance: bool = typer.Option(True, "--balance/--no-balance",
                                     help="With --workers N: a worker holding 2+ keep-alive connections more than the least "
                                          "loaded one closes one after its response, so connections even out."),
    ) -> None:
        """Serve the rerank HTTP API (Cohere-compatible /v1/rerank, /rerank, /search, /events, /metrics)."""
        import uvicorn

        from indexing.errors import ConfigError
        from workers.service.app import create_app
        from workers.service.state import ServiceState
        from workers.settings import load_settings

        from indexing.encoders import threads_from_env

        # before any model loads. One compute thread per process by default: a rerank call's matmuls are small (a
        # second intra-op thread mostly spins) and the call already uses a second core while its query is encoded;
        # more throughput: --workers
        try:
            setup_server_process(threads if threads is not None else threads_from_env())
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        settings = load_settings()
        state = ServiceState.loading(settings, auth=not no_auth, images_root=images_root.resolve() if images_root else None, freeze_gc=True)
        state.watch_model = True  # follow `fusionrank model promote | rollback` and the retrain task's promotions
        try:
            state.check_auth_config()
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        common = dict(host=host, port=port, log_level=log_level, access_log=access_log, loop=loop, http=http)
        if workers > 1:
            import shutil
            import tempfile

            from workers.service.balance import BALANCE_FILE_ENV, WORKERS_ENV

            os.environ[NO_AUTH_ENV] = "1" if no_auth else "0"
            if images_root:
                os.environ[IMAGES_ROOT_ENV] = str(images_root.resolve())
            shared = tempfile.mkdtemp(prefix="fusionrank-serve-") if balance else None  # the workers' connection counts
            if shared:  # read by the workers' settings (workers.service.balance.from_settings)
                os.environ[BALANCE_FILE_ENV], os.environ[WORKERS_ENV] = os.path.join(shared, "connections"), str(workers)
            else:
                os.environ.pop(BALANCE_FILE_ENV, None)
            try:
                run_workers(uvicorn.Config("workers.commands.serve:app_factory", factory=True, workers=workers, **common))
            finally:
                if shared:
                    shutil.rmtree(shared, ignore_errors=True)
            return
        server = uvicorn.Server(uvicorn.Config(create_app(state), workers=1, **common))
        state.on_load_error = lambda e: setattr(server, "should_exit", True)
        server.run()
        if state.error:
            typer.echo(f"error: the service could not load its model: {state.error}", err=True)
            raise typer.Exit(1)

    @bench.command("serve")
    def bench_serve_cmd(
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
        synthetic: bool = typer.Option(False, "--synthetic", help="Serve a small generated catalog with an untrained model (runs anywhere)."),
        synthetic_size: int = typer.Option(300, "--synthetic-size", min=100, help="Products in the generated catalog."),
        requests_n: int = typer.Option(300, "--requests", min=1, help="Requests per concurrency level."),
        candidates: int = typer.Option(100, "--candidates", min=1, max=10_000, help="Hits per /rerank request."),
        levels: str = typer.Option("1,8,32", "--concurrency", help="Comma-separated concurrency levels."),
        seed: int = typer.Option(0, "--seed"),
        server_workers: int = typer.Option(1, "--server-workers", min=1, max=64, help="uvicorn worker processes of the server under load."),
        engine: Optional[str] = engine_opt.option(),
        compare_ubi_record: bool = typer.Option(False, "--compare-ubi-record", help="servers with the UBI recording (FUSIONRANK_UBI_RECORD) "
                                                "off and on, alternating over two rounds: p50/p99 of each and the difference"),
        via_opensearch: bool = typer.Option(False, "--via-opensearch", help="searches through an OpenSearch node with the fusionrank pipeline vs "
                                            "without it (synthetic world; the dev node unless --opensearch-url); default levels 1,8"),
        opensearch_url: Optional[str] = typer.Option(None, "--opensearch-url", help="--via-opensearch: a cluster with the fusionrank plugin "
                                                     "that reaches this machine's 127.0.0.1 (default: start the dev node)"),
        budget_ms: int = typer.Option(50, "--budget-ms", min=1, max=60_000, help="--via-opensearch: the pipeline processor's budget"),
    ) -> None:
        """Loopback load on a real uvicorn server: POST /rerank with an OpenSearch response of N hits, at each
        concurrency level: rps, p50, p99; plus the HTTP overhead over the in-process call."""
        from workers.bench.serve import run_serve_bench

        lv = tuple(int(x) for x in levels.split(",") if x.strip())
        if not lv or min(lv) < 1:
            raise typer.BadParameter("--concurrency takes positive integers, e.g. 1,8,32")
        if via_opensearch:
            from workers.bench.via_opensearch import run_via_opensearch_bench

            if levels == "1,8,32":
                lv = (1, 8)
            res = run_via_opensearch_bench(synthetic_size=synthetic_size, requests=requests_n, candidates=candidates, levels=lv,
                                           seed=seed, budget_ms=budget_ms, opensearch_url=opensearch_url)
            typer.echo(json.dumps(res, indent=None if as_json else 2))
            return
        if opensearch_url is not None:
            raise typer.BadParameter("--opensearch-url goes with --via-opensearch")
        engine_name = engine_opt.use(engine)
        if synthetic and engine_name != "local":
            raise typer.BadParameter("--synthetic serves a generated catalog on the local engine; leave --engine out or say local")
        result = run_serve_bench(synthetic=synthetic, synthetic_size=synthetic_size, requests=requests_n,
                                 candidates=candidates, levels=lv, seed=seed, server_workers=server_workers,
                                 compare_ubi_record=compare_ubi_record)
        result = {"engine": engine_name, **result}
        typer.echo(json.dumps(result, indent=None if as_json else 2))
