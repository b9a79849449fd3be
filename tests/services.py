"""Real local services for the tests: Redis, RabbitMQ and PostgreSQL on 127.0.0.1.

A service that is not answering is started with the machine's own start command (the ones this
machine kind documents), then waited for. If it still does not answer, the test fails with the reason:
these tests are never faked.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int
    start: list[str]


def _pg_start() -> list[str]:
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1] if versions else "15", "main", "start"]


SERVICES = {
    "redis": lambda: Service(
        "redis", "127.0.0.1", 6379,
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
         "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"],
    ),
    "rabbitmq": lambda: Service("rabbitmq", "127.0.0.1", 5672, ["rabbitmq-server", "-detached"]),
    "postgres": lambda: Service("postgres", "127.0.0.1", 5432, _pg_start()),
}


def is_up(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure(name: str, wait_s: float = 60.0) -> Service:
    """Return the service once it accepts connections, starting it if needed; raise RuntimeError if it cannot."""
    svc = SERVICES[name]()
    if is_up(svc.host, svc.port):
        return svc
    if shutil.which(svc.start[0]) is None:
        raise RuntimeError(f"{name} is not answering on {svc.host}:{svc.port} and {svc.start[0]!r} is not installed")
    subprocess.run(svc.start, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if is_up(svc.host, svc.port):
            return svc
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not come up on {svc.host}:{svc.port} after {' '.join(svc.start)}")
