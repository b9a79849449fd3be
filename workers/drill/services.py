"""Throwaway PostgreSQL and Redis servers for ``fusionrank drill``: real server binaries, private data folders,
free loopback ports, so a drill can stop and restart them without touching anyone else's services.

* :class:`PrivatePostgres` — ``initdb`` + ``pg_ctl`` (PostgreSQL refuses to run as root: as root the cluster
  belongs to the ``postgres`` account and its commands run through ``runuser -u postgres``).
* :class:`PrivateRedis` — ``redis-server`` with the append-only file on, as in ``docker-compose.yml``, so an
  accepted message survives a restart.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from indexing.errors import ConfigError, FusionRankError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> Path:
    """The folder holding ``initdb``/``pg_ctl``: PATH first, then Debian's ``/usr/lib/postgresql/<v>/bin``."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "pg_ctl").is_file() and (Path(d) / "initdb").is_file():
            return Path(d)
    raise ConfigError("the drill needs the PostgreSQL server programs (initdb, pg_ctl): install Debian's postgresql package")


class PrivatePostgres:
    """One PostgreSQL cluster in its own folder on a free port; :attr:`url` is its SQLAlchemy URL."""

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fusionrank-drill-pg-"))
        self.data = self.root / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise ConfigError("running as root, the drill starts PostgreSQL as the 'postgres' account and needs runuser")
            try:
                shutil.chown(self.root, "postgres", "postgres")
            except LookupError:
                raise ConfigError("running as root, the drill needs a 'postgres' account to own its PostgreSQL cluster") from None
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120.0) -> None:
        cmd = [*self._as, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if r.returncode:
            raise FusionRankError(f"{Path(args[0]).name} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-1500:]}")

    def init(self) -> "PrivatePostgres":
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-instructions")
        return self

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o", opts, "start")

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as when the database host goes away."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        except Exception as e:  # cleanup must not hide the drill's own outcome
            log.warning("stopping the drill's PostgreSQL failed: %s", e)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """One ``redis-server`` (AOF on) in its own folder on a free port; :attr:`url` is the broker URL."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ConfigError("the drill needs redis-server on PATH: install Debian's redis-server package")
        self.exe = exe
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fusionrank-drill-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root), "--appendonly", "yes",
               "--save", "", "--daemonize", "no", "--logfile", str(self.root / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            if self.proc.poll() is not None:
                raise FusionRankError(f"redis-server exited with {self.proc.returncode}: {(self.root / 'redis.log').read_text(errors='replace')[-1500:]}")
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise FusionRankError("redis-server did not answer PING within 30 s")

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


__all__ = ["PrivatePostgres", "PrivateRedis", "free_port"]
