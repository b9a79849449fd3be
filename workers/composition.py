"""Wiring from settings to parts (engines, encoders, stores, the served reranker). Only the process edge calls this."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from indexing.engines import create_engine

if TYPE_CHECKING:
    from indexing.engines.base import SearchEngine
    from rerank.reranker import Reranker
    from workers.settings import Settings

log = logging.getLogger(__name__)


def build_engine(settings: "Settings") -> "SearchEngine":
    """The configured search engine: ``local`` persists under ``data_dir/engine``."""
    if settings.engine == "local":
        return create_engine("local", path=settings.data_dir / "engine")
    return create_engine(settings.engine, **settings.opensearch_kwargs())


def build_reranker(settings: "Settings | None" = None, *, engine: Any | None = None, history: bool = True) -> "Reranker":
    """The served :class:`~rerank.reranker.Reranker`, wired from settings (``workers.settings.Settings``; read from the
    environment when ``None``): the configured engine and index alias, the model artifact at
    ``settings.effective_model_dir`` (checked against the index mapping and the configured text
    encoder), the text encoder (and the image encoder when the model has one), the history store at
    ``settings.effective_sql_url`` behind a :class:`~rerank.history.ProfileService`,
    ``settings.rerank_budget_ms`` and the index's default diversity (``settings.diversity_for(index)``) with
    ``settings.diversity_config()``.

    Raises :class:`ModelArtifactError` when there is no model (``fusionrank demo`` or
    ``fusionrank train --out DIR`` make one; ``FUSIONRANK_MODEL_DIR`` points at it),
    :class:`IndexNotFoundError` when the index is missing, and :class:`NotMigratedError` when the
    history database is not migrated (``fusionrank db upgrade``). ``history=False`` serves without
    personalization.
    """
    from indexing.encoders import get_image_encoder, get_text_encoder, select_query_encoder
    from indexing.errors import ModelArtifactError
    from rerank.model.artifact import CONFIG_FILE, load_artifact
    from rerank.reranker import Reranker
    from workers.settings import load_settings

    settings = settings if settings is not None else load_settings()
    model_dir = settings.effective_model_dir
    if not (model_dir / CONFIG_FILE).is_file():
        raise ModelArtifactError(
            f"no fusion model at {model_dir}: run `fusionrank demo` (trains and installs one there) or "
            "`fusionrank train ... --out DIR` and set FUSIONRANK_MODEL_DIR=DIR"
        )
    engine = engine if engine is not None else build_engine(settings)
    index = settings.index_alias
    text = get_text_encoder(settings.text_model, backend=settings.text_backend, device=settings.device)
    model = load_artifact(model_dir, mapping=engine.get_mapping(index), text_model_id=text.model_id, device=settings.device)
    # a cheaper query encoder, only where it encodes like the index's (auto: the fastest that does, on the CPU)
    query_text, why = select_query_encoder(text, getattr(settings, "query_text_backend", None), text_model=settings.text_model, device=settings.device)
    log.info("queries encoded by %s: %s", query_text.model_id, why)
    stands_in_for = text.model_id if query_text is not text else None
    text = query_text
    image = get_image_encoder(settings.image_model, device=settings.device) if model.image_encoder is not None else None
    if image is not None and image.model_id != model.image_encoder.model_id:
        raise ModelArtifactError(f"{model_dir}: trained on image encoder {model.image_encoder.model_id!r}, configured {image.model_id!r}")
    profiles = None
    if history:
        from rerank.history import EngineVectorSource, HistoryStore, ProfileService

        store = HistoryStore(settings.effective_sql_url)
        profiles = ProfileService(store, EngineVectorSource(engine, index))
    div = settings.diversity_for(index) if hasattr(settings, "diversity_for") else 0.0
    div_cfg = settings.diversity_config() if hasattr(settings, "diversity_config") else None
    r = Reranker(engine, index, model, text_encoder=text, image_encoder=image, history=profiles, budget_ms=settings.rerank_budget_ms,
            stands_in_for=stands_in_for, model_runtime=getattr(settings, "model_runtime", "auto"), diversity=div, diversity_config=div_cfg)
    prefill = getattr(settings, "aligned_cache_prefill", None)
    if prefill or (prefill is None and settings.engine == "local"):
        t = time.perf_counter()
        n = r.prefill_aligned_cache()
        if n:
            log.info("aligned-photo cache: %d indexed photos projected in %.1f s", n, time.perf_counter() - t)
    if getattr(settings, "doc_cache_prefill", False) and hasattr(engine, "prefill_doc_cache"):
        t = time.perf_counter()
        n = engine.prefill_doc_cache(index, r.fetch_fields())  # the candidates' and the profiles' fields alike
        log.info("document cache: %d documents of %s read in %.1f s", n, index, time.perf_counter() - t)
    r.warm_up()
    log.info("reranker ready: model %s (%s runtime) from %s over %s index %r", model.version, r.model_runtime, model_dir, settings.engine, index)
    return r

