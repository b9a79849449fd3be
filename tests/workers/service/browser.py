"""Support for the search-page tests: Debian's Chromium (installed with apt-get when missing), a real uvicorn
server on 127.0.0.1 in a thread, and product photos drawn like the synthetic catalog's.

Playwright for Python drives the system Chromium through ``executable_path``; ``playwright install`` (a
browser download) is never run: this machine reaches only the package registries.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: article type of the test world's products -> the synthetic catalog's drawn silhouette
SHAPES = {"Shoes": "shoe", "Dresses": "dress", "Jeans": "trousers", "Tshirts": "top", "Handbags": "handbag",
          "Belts": "watch", "Backpacks": "backpack", "Socks": "shoe", "Sweaters": "top", "Shirts": "shirt"}
_INSTALL_LOCK = threading.Lock()


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=timeout, env=env)


def ensure_chromium() -> str:
    """The path of Debian's Chromium; ``apt-get install -y chromium`` (after ``apt-get update`` when the
    first try fails) when it is missing. Fails the test with the reason when that is impossible."""
    with _INSTALL_LOCK:
        if os.access(CHROMIUM, os.X_OK):
            return CHROMIUM
        if shutil.which("apt-get") is None:
            pytest.fail(f"{CHROMIUM} is missing and apt-get is not available to install Debian's 'chromium' package")
        tries = []
        for step in (("install",), ("update", "install")):
            if "update" in step:
                r = _apt("update", timeout=600)
                tries.append(f"apt-get update: exit {r.returncode}: {r.stderr.strip()[-400:]}")
            r = _apt("install", "-y", "chromium", timeout=900)
            tries.append(f"apt-get install -y chromium: exit {r.returncode}: {r.stderr.strip()[-400:]}")
            if r.returncode == 0 and os.access(CHROMIUM, os.X_OK):
                return CHROMIUM
        pytest.fail(f"{CHROMIUM} is missing and installing Debian's 'chromium' package failed (needs root and the Debian "
                    "package mirror):\n" + "\n".join(tries))


@contextlib.contextmanager
def live_server(app: Any, *, start_timeout_s: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port} within {start_timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def draw_photos(images_root: Path, products: list[tuple], *, seed: int = 0) -> int:
    """(Re)draw each product's photo ``images/<id>.png`` as the synthetic catalog draws them (a silhouette of its
    article type in its colour, 224x224); returns how many were drawn."""
    from indexing.synthetic import COLOURS, draw_product

    rnd = random.Random(seed)
    folder = images_root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for pid, _title, article, colour, *_ in products:
        draw_product(SHAPES.get(article, "top"), COLOURS.get(colour, COLOURS["Grey"]), rnd).save(folder / f"{pid}.png")
    return len(products)
