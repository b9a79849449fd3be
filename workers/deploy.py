"""Install a trained model (and, on the embedded engine, an index) as what the rerank call serves.

``Reranker.from_settings()`` and ``fusionrank serve`` read the model at ``settings.effective_model_dir``
(default ``<data_dir>/models/current``) and search ``settings.index_alias`` in the configured engine.

* :func:`install_model` copies an artifact directory to ``<data_dir>/models/<artifact_version>/`` and
  points the ``current`` symlink at it (replaced atomically; the previous target stays on disk, so going
  back is ``install_model(<data_dir>/models/<old version>)``).
* :func:`install_local_index` gives the embedded engine at ``<data_dir>/engine`` the documents of an
  evaluation-cache index (a copy of its files, made once) and points ``settings.index_alias`` at it.
  An engine that already has that alias is left alone (it is the user's own index).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from indexing.errors import ConfigError, ModelArtifactError

log = logging.getLogger(__name__)


def install_model(settings: Any, artifact_dir: str | Path) -> tuple[Path, str]:
    """Copy ``artifact_dir`` under ``<data_dir>/models/`` and make it ``current``; ``(dir, version)``."""
    from rerank.artifacts import CONFIG_FILE, read_config

    src = Path(artifact_dir)
    if not (src / CONFIG_FILE).is_file():
        raise ModelArtifactError(f"{src} is not a model artifact (no {CONFIG_FILE})")
    version = str(read_config(src).get("artifact_version") or "").replace(":", "-") or src.name
    models = Path(settings.data_dir) / "models"
    dest = models / version
    if src.resolve() != dest.resolve() and not (dest / CONFIG_FILE).is_file():
        tmp = models / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dest)
    link, tmp_link = models / "current", models / ".current.tmp"
    if link.exists() and not link.is_symlink():
        raise ConfigError(f"{link} exists and is not a symlink; move it away to install a model")
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(dest.name, target_is_directory=True)
    os.replace(tmp_link, link)
    log.info("model %s installed as %s", version, link)
    return dest, version


def install_local_index(settings: Any, source_engine_dir: str | Path, source_alias: str) -> tuple[Path, str, str]:
    """Give ``<data_dir>/engine`` the index behind ``source_alias`` of the engine at ``source_engine_dir``
    under ``settings.index_alias``; ``(engine path, index, note)``. Leaves an existing alias alone."""
    from indexing.engines import create_engine

    if settings.engine != "local":
        return Path(), settings.index_alias, f"engine is {settings.engine}: index the catalog there (fusionrank index / reindex)"
    dest = Path(settings.data_dir) / "engine"
    if dest.is_dir():
        eng = create_engine("local", path=dest)
        try:
            have = eng.get_alias(settings.index_alias)
        finally:
            eng.close()
        if have:
            return dest, have[0], f"alias {settings.index_alias!r} already in {dest}: left as it is"
        if any(dest.iterdir()):
            raise ConfigError(f"{dest} holds an engine without the alias {settings.index_alias!r}; point it at an index "
                              "with `fusionrank reindex` or move the folder away")
        dest.rmdir()
    src = Path(source_engine_dir)
    eng = create_engine("local", path=src)
    try:
        targets = eng.get_alias(source_alias)
    finally:
        eng.close()
    if not targets:
        raise ConfigError(f"{src} has no alias {source_alias!r}")
    tmp = dest.with_name(".engine.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dest)
    eng = create_engine("local", path=dest)
    try:
        eng.swap_alias(settings.index_alias, targets[0])
    finally:
        eng.close()
    log.info("index %s copied to %s as alias %s", targets[0], dest, settings.index_alias)
    return dest, targets[0], f"copied from {src}"


__all__ = ["install_local_index", "install_model"]
