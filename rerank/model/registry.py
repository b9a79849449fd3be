"""Every trained model version, which one serves, and how it came to serve: :class:`ModelRegistry`.

A registry is a folder (``<data_dir>/models`` by default): one sub-folder per artifact version (``config.json`` +
weights, never changed once written), the ``current`` symlink naming the served one (replaced atomically, so a
reader sees the old or the new target, never a half-written one), and ``ledger.jsonl``, one JSON line per
promotion, rollback and retraining decision (the candidates that were refused are kept too, with the numbers that
refused them). The service follows ``current`` (:meth:`workers.service.state.ServiceState.check_model_link`).

Rollback goes back along the promotions: the ledger is replayed as a stack (a promotion pushes, a rollback pops),
so two rollbacks after two promotions come back to the first model. Writers take an exclusive ``flock`` on
``.lock`` in the folder: two processes promoting at once are serialised and the ledger stays one line per action.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from indexing.errors import ConfigError, ModelArtifactError

log = logging.getLogger(__name__)

LEDGER = "ledger.jsonl"
LINK = "current"


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path
    created: str  # artifact_version's UTC time, else the folder's mtime
    current: bool
    validation_ndcg: float | None  # the training run's best validation NDCG@10 (its own judgments), if recorded
    trained_from: str | None  # where its training data came from (e.g. "ubi-store"), if recorded

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "path": str(self.path), "created": self.created, "current": self.current,
                "validation_ndcg@10": self.validation_ndcg, "trained_from": self.trained_from}


def _version_of(artifact_dir: Path) -> str:
    from rerank.model.artifact import CONFIG_FILE, read_config

    if not (artifact_dir / CONFIG_FILE).is_file():
        raise ModelArtifactError(f"{artifact_dir} is not a model artifact (no {CONFIG_FILE})")
    return str(read_config(artifact_dir).get("artifact_version") or "").replace(":", "-") or artifact_dir.name


class ModelRegistry:
    """The model versions under ``root`` and the ``current`` link among them."""

    def __init__(self, root: str | Path, *, link: str = LINK):
        self.root = Path(root)
        self.link = self.root / link

    # ------------------------------------------------------------------ reads
    def current(self) -> str | None:
        """The served version (the name ``current`` points at), or None when nothing is installed."""
        if not self.link.is_symlink():
            if self.link.exists():
                raise ConfigError(f"{self.link} exists and is not a symlink; move it away to manage models with the registry")
            return None
        return Path(os.readlink(self.link)).name

    def path(self, version: str) -> Path:
        from rerank.model.artifact import CONFIG_FILE

        if not version or "/" in version or version.startswith(".") or version == self.link.name:
            raise ConfigError(f"invalid model version {version!r}")
        p = self.root / version
        if not (p / CONFIG_FILE).is_file():
            known = ", ".join(v.version for v in self.versions()) or "none"
            raise ConfigError(f"no model version {version!r} in {self.root} (versions: {known})")
        return p

    def versions(self) -> list[ModelVersion]:
        """Every version, oldest first (by the time in its ``artifact_version``, else the folder's mtime)."""
        from rerank.model.artifact import CONFIG_FILE

        if not self.root.is_dir():
            return []
        cur = self.current()
        out = []
        for d in self.root.iterdir():
            if d.name.startswith(".") or d.is_symlink() or not (d / CONFIG_FILE).is_file():
                continue
            created = d.name.split("-", 1)[0] if d.name[:8].isdigit() and "T" in d.name[:16] else \
                time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(d.stat().st_mtime))
            ndcg, src = None, None
            rep = d / "training_report.json"
            if rep.is_file():
                try:
                    r = json.loads(rep.read_text())
                    ndcg = r.get("best_validation_ndcg@10")
                    src = r.get("trained_from") or ",".join(sorted((r.get("datasets") or {}).keys())) or None
                except (OSError, ValueError):
                    pass
            out.append(ModelVersion(d.name, d, created, d.name == cur, ndcg, src))
        return sorted(out, key=lambda v: (v.created, v.version))

    def ledger(self) -> list[dict[str, Any]]:
        p = self.root / LEDGER
        if not p.is_file():
            return []
        out = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("%s:%d: not JSON, skipped", p, n)  # a torn last line of a crashed writer
        return out

    def serving_stack(self) -> list[str]:
        """The versions that served, in order, the current one last (the ledger replayed; rollbacks popped)."""
        stack: list[str] = []
        for e in self.ledger():
            if e.get("action") == "promote":
                if not stack or stack[-1] != e["version"]:
                    stack.append(e["version"])
            elif e.get("action") == "rollback" and stack:
                stack.pop()
                if not stack or stack[-1] != e["version"]:
                    stack.append(e["version"])
        cur = self.current()
        if cur is not None and (not stack or stack[-1] != cur):
            stack.append(cur)  # installed by hand (an older version of fusionrank, or a symlink set outside)
        return stack

    # ------------------------------------------------------------------ writes
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _append(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
        with open(self.root / LEDGER, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append a decision (e.g. a refused candidate with its evaluation) to the ledger."""
        with self._locked():
            return self._append(entry)

    def add(self, artifact_dir: str | Path, *, move: bool = False) -> str:
        """Copy (``move``: rename) an artifact into the registry as ``<root>/<version>``; its version. Adding a
        version that is there already changes nothing."""
        src = Path(artifact_dir)
        version = _version_of(src)
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / version
        if dest.exists() and src.resolve() != dest.resolve():
            if move:
                shutil.rmtree(src, ignore_errors=True)
            return version
        if src.resolve() == dest.resolve():
            return version
        tmp = self.root / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if move:
            os.replace(src, tmp)
        else:
            shutil.copytree(src, tmp)
        os.replace(tmp, dest)
        return version

    def _point(self, version: str) -> None:
        tmp = self.root / f".{self.link.name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(version, target_is_directory=True)
        os.replace(tmp, self.link)

    def promote(self, version: str, *, reason: str = "by hand", evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make ``version`` the served one; the ledger entry (with the version it replaced)."""
        with self._locked():
            self.path(version)
            previous = self.current()
            self._point(version)
            entry = self._append({"action": "promote", "version": version, "previous": previous, "reason": reason,
                                  **({"evaluation": evaluation} if evaluation is not None else {})})
        log.info("model %s promoted (was %s): %s", version, previous, reason)
        return entry

    def rollback(self, *, reason: str = "by hand") -> dict[str, Any]:
        """Serve the version that served before the current one; ConfigError when there is none."""
        with self._locked():
            stack = self.serving_stack()
            if len(stack) < 2:
                raise ConfigError(f"nothing to roll back to in {self.root}: "
                                  + (f"{stack[0]} is the only version that has served" if stack else "no model has been promoted"))
            current, target = stack[-1], stack[-2]
            self.path(target)
            self._point(target)
            entry = self._append({"action": "rollback", "version": target, "previous": current, "reason": reason})
        log.info("model rolled back: %s -> %s", current, target)
        return entry


__all__ = ["LEDGER", "LINK", "ModelRegistry", "ModelVersion"]
