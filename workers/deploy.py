"""Install a trained model (and, on the embedded engine, an index) as what the rerank call serves.

``build_reranker()`` and ``fusionrank serve`` read the model at ``settings.effective_model_dir``
(default ``<data_dir>/models/current``) and search ``settings.index_alias`` in the configured engine.

* :func:`install_model` copies an artifact directory into the model registry (:class:`rerank.model.registry.ModelRegistry`,
  ``<data_dir>/models/<artifact_version>/``) and promotes it: the ``current`` symlink is replaced atomically, the
  previous version stays on disk and in the ledger (``fusionrank model rollback`` goes back to it).
* :func:`install_opensearch_index` (``FUSIONRANK_ENGINE=opensearch``) copies an evaluation-cache index, documents
  and stored vectors, into the cluster as ``fusionrank-eval-<key>`` and points ``settings.index_alias`` at it, with
  the same rules for an alias that is already there (an earlier demo's index, named ``fusionrank-eval-...``, is
  replaced when the model cannot serve it; the user's own index is left alone, or refused when it does not fit).
* :func:`install_local_index` gives the embedded engine at ``<data_dir>/engine`` the documents of an
  evaluation-cache index (a copy of its files, made once) and points ``settings.index_alias`` at it.
  An engine that already has that alias is left alone (it is the user's own index), unless the model to
  be served cannot serve it: an earlier demo's index is then replaced (it stays in the engine's
  ``indices/`` folder), the user's own index is an error that names why.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from indexing.errors import ConfigError, ModelArtifactError

log = logging.getLogger(__name__)


def install_model(settings: Any, artifact_dir: str | Path) -> tuple[Path, str]:
    """Copy ``artifact_dir`` into the model registry (``<data_dir>/models/``) and promote it to ``current``;
    ``(dir, version)``. Installing the served version again changes nothing (no ledger line)."""
    from rerank.model.registry import ModelRegistry

    reg = ModelRegistry(Path(settings.data_dir) / "models")
    reg.current()  # a `current` that is not a symlink: ConfigError before anything is copied
    version = reg.add(artifact_dir)
    if reg.current() != version:
        reg.promote(version, reason=f"installed from {artifact_dir}")
    log.info("model %s installed as %s", version, reg.link)
    return reg.root / version, version


def install_local_index(settings: Any, source_engine_dir: str | Path, source_alias: str,
                        fits: Callable[[Mapping[str, Any]], str | None] | None = None) -> tuple[Path, str, str]:
    """Give ``<data_dir>/engine`` the index behind ``source_alias`` of the engine at ``source_engine_dir``
    under ``settings.index_alias``; ``(engine path, index, note)``.

    An existing alias is left alone, unless ``fits(mapping)`` (the model to be served, checked against the
    mapping of the index the alias points at) names a problem: then an index of an earlier demo run (named
    ``eval-...``) is replaced by the new one (the old one stays in the engine's ``indices/`` folder until
    deleted), and the user's own index raises :class:`ConfigError` naming the
    problem (nothing is changed)."""
    if settings.engine != "local":
        return Path(), settings.index_alias, f"engine is {settings.engine}: index the catalog there (fusionrank index / reindex)"
    dest = Path(settings.data_dir) / "engine"
    src = Path(source_engine_dir)
    if dest.is_dir():
        def look(eng: Any) -> tuple[list[str], str | None]:
            have = eng.get_alias(settings.index_alias)
            return have, (fits(eng.get_mapping(have[0])) if have and fits is not None else None)

        have, problem = _on_engine(dest, look)
        if have and problem is None:
            return dest, have[0], f"alias {settings.index_alias!r} already in {dest}: left as it is"
        if have:
            if not have[0].startswith(DEMO_INDEX_PREFIX):
                raise ConfigError(f"the alias {settings.index_alias!r} in {dest} points at {have[0]!r}, which the new model cannot "
                                  f"serve: {problem}")
            index = _install(src, source_alias, dest, settings.index_alias, whole_engine=False)
            return dest, index, (f"alias {settings.index_alias!r} moved from the earlier demo index {have[0]!r} (kept in "
                                 f"{dest / 'indices'}) to {index!r}, because the new model cannot serve it: {problem}")
        if any(dest.iterdir()):
            raise ConfigError(f"{dest} holds an engine without the alias {settings.index_alias!r}; point it at an index "
                              "with `fusionrank reindex` or move the folder away")
        dest.rmdir()
    index = _install(src, source_alias, dest, settings.index_alias, whole_engine=True)
    return dest, index, f"copied from {src}"


#: evaluation-cache indexes (what the demo installs) are named ``eval-<timestamp>``
DEMO_INDEX_PREFIX = "eval-"
#: ... and ``fusionrank-eval-<key>`` when copied into OpenSearch (:func:`rerank.evaluation.harness.mirror_index`)
OPENSEARCH_DEMO_PREFIX = "fusionrank-eval-"


def install_opensearch_index(settings: Any, engine: Any, idx: Any, fits: Callable[[Mapping[str, Any]], str | None] | None = None,
                             progress: bool = False) -> tuple[str, str]:
    """Copy the evaluation-cache index ``idx`` into the OpenSearch ``engine`` and point ``settings.index_alias`` at it;
    ``(index, note)``. An alias already there is kept when the model fits it (``fits(mapping)`` is None), moved
    when it points at an earlier demo's copy, and refused (ConfigError, nothing changed) when it is the user's own
    index and the model cannot serve it."""
    from rerank.evaluation.harness import mirror_index

    have = engine.get_alias(settings.index_alias)
    problem = fits(engine.get_mapping(have[0])) if have and fits is not None else None
    if have and problem is None:
        return have[0], f"alias {settings.index_alias!r} already on {engine.display_url}: left as it is"
    if have and not have[0].startswith(OPENSEARCH_DEMO_PREFIX):
        raise ConfigError(f"the alias {settings.index_alias!r} on {engine.display_url} points at {have[0]!r}, which the new "
                          f"model cannot serve: {problem}")
    copy = mirror_index(idx, engine, mapping=settings.mapping, hnsw_engine=settings.hnsw_engine, progress=progress)
    engine.swap_alias(settings.index_alias, copy.alias)
    note = f"copied into {engine.display_url} as {copy.alias}"
    if have:
        note += f" (alias moved from the earlier demo index {have[0]!r}: {problem})"
    log.info("index %s on %s is now alias %s", copy.alias, engine.display_url, settings.index_alias)
    return copy.alias, note


def _on_engine(path: Path, fn: Callable[[Any], Any]) -> Any:
    """``fn(engine)`` on the local engine at ``path``, closed afterwards."""
    from indexing.engines import create_engine

    eng = create_engine("local", path=path)
    try:
        return fn(eng)
    finally:
        eng.close()


def _install(src: Path, source_alias: str, dest: Path, alias: str, *, whole_engine: bool) -> str:
    """Copy the index behind ``source_alias`` of the engine at ``src`` into ``dest`` and point ``alias`` at it there.

    ``whole_engine``: ``dest`` does not exist yet and becomes a copy of the whole engine folder; otherwise only the
    index's own folder under ``indices/`` is copied into the existing engine. Either is copied to a temporary name
    first and renamed into place."""
    targets = _on_engine(src, lambda eng: eng.get_alias(source_alias))
    if not targets:
        raise ConfigError(f"{src} has no alias {source_alias!r}")
    index = targets[0]
    if whole_engine:
        _copy_tree(src, dest)
    elif not (dest / "indices" / index).is_dir():
        _copy_tree(src / "indices" / index, dest / "indices" / index)
    _on_engine(dest, lambda eng: eng.swap_alias(alias, index))
    log.info("index %s copied to %s as alias %s", index, dest, alias)
    return index


def _copy_tree(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dest)


def model_fits(artifact_dir: str | Path) -> Callable[[Mapping[str, Any]], str | None]:
    """``fits(mapping)``: None when the artifact can serve an index of that mapping, else why not."""
    from rerank.model.artifact import check_compatible, read_config

    config = read_config(artifact_dir)

    def fits(mapping: Mapping[str, Any]) -> str | None:
        try:
            check_compatible(config, where=str(artifact_dir), mapping=mapping)
        except ModelArtifactError as e:
            return str(e)
        return None

    return fits


__all__ = ["DEMO_INDEX_PREFIX", "OPENSEARCH_DEMO_PREFIX", "install_local_index", "install_model", "install_opensearch_index", "model_fits"]
