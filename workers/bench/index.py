"""``fusionrank bench index``: indexing throughput, and the pipeline's overhead over the raw encoders.

The same products (the first N rows of the fashion benchmark catalog that have a photo) are encoded
twice in one run: by the encoders alone (texts and already-decoded images in memory), then by the whole
indexing job (catalog reading, image reading and decoding, hashing, encoding, documents, bulk writes,
commit) into a fresh LocalEngine. ``overhead_pct`` compares the two; the raw encoders run before and
after the pipeline and the faster run counts, so load drifting on a shared machine overstates the
overhead rather than hiding it.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import uuid
import tempfile
import time
from pathlib import Path
from typing import Any

from indexing.errors import ConfigError
from indexing.machine import machine_info

log = logging.getLogger(__name__)


def _slice_with_images(catalog: Path, images_root: Path, limit: int, out: Path) -> int:
    with catalog.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for r in reader:
            if r.get("image"):
                rows.append(r)
                if len(rows) >= limit:
                    break
        header = reader.fieldnames or []
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def run_index_bench(
    settings,
    *,
    catalog: Path,
    images_root: Path,
    limit: int = 2000,
    batch_size: int = 256,
    via: str = "inline",
) -> dict[str, Any]:
    from indexing.catalog import Product, read_catalog
    from indexing.documents import product_text
    from indexing.images import load_image
    from indexing.pipeline import Encoders, IndexJob
    from workers.composition import build_engine
    from workers.jobs import run_index_job

    if not catalog.is_file():
        raise ConfigError(f"benchmark catalog not found: {catalog} (set FUSIONRANK_SHARED_DATA or pass --catalog)")
    with tempfile.TemporaryDirectory(prefix="fusionrank-bench-index-") as tmp:
        tmp_path = Path(tmp)
        sliced = tmp_path / "catalog.csv"
        n = _slice_with_images(catalog, images_root, limit, sliced)
        products = [p for p in read_catalog(sliced, images_root=images_root) if isinstance(p, Product)]
        job = IndexJob(
            catalog=str(sliced), index="bench", images_root=str(images_root), text_model=settings.text_model,
            text_backend=settings.text_backend, image_model=settings.image_model, device=settings.device, batch_size=batch_size,
            attribute_model=str(settings.attribute_model_dir.resolve()) if settings.attribute_model_dir else None,
            attribute_threshold=settings.attribute_completion_threshold,
        )
        enc = Encoders.for_job(job)
        texts = [product_text(p) for p in products]
        t = time.perf_counter()
        images = [load_image(p.image, images_root) for p in products]
        decode_s = time.perf_counter() - t
        enc.text.encode(texts[:8])  # models loaded and warm before anything is timed
        enc.image.encode(images[:4])

        def raw_run() -> tuple[float, float]:
            t = time.perf_counter()
            enc.text.encode(texts)
            text_s = time.perf_counter() - t
            t = time.perf_counter()
            enc.image.encode(images)
            return text_s, time.perf_counter() - t

        raw_before = raw_run()
        attr_s = regions_s = None
        if job.attribute_model:  # the photo attribute step alone (pixel features, object count, heads) on the same photos
            from indexing.photo_attributes import image_vectors, load_cached, predict_images

            model, _ = load_cached(job.attribute_model, enc.image_info.model_id)
            t = time.perf_counter()
            vecs, regions = image_vectors(enc.image, images, model)
            if regions is not None:  # the forward pass that also pools the maps over the product (replaces encode)
                regions_s = time.perf_counter() - t
            t = time.perf_counter()
            predict_images(model, images, list(vecs), regions=regions)
            attr_s = time.perf_counter() - t

        if via == "celery":
            # running workers write where their own settings say: a fresh alias in the shared data dir, removed after
            alias = f"bench-index-{uuid.uuid4().hex[:12]}"
            bench_settings = settings.model_copy(update={"index_alias": alias})
        else:
            alias = "bench"
            bench_settings = settings.model_copy(update={"data_dir": tmp_path / "data", "index_alias": alias})
        job = dataclasses.replace(job, index=alias)
        engine = build_engine(bench_settings)
        t = time.perf_counter()
        try:
            summary = run_index_job(engine, bench_settings, job, via=via, progress=False)
            pipeline_s = time.perf_counter() - t
        finally:
            if via == "celery":
                for index in engine.get_alias(alias):
                    engine.delete_index(index)
            engine.close()
        # the raw encoders again after the pipeline: on a shared machine the load drifts, so the overhead is
        # taken against the faster of the two raw runs (which overstates it rather than hides it)
        raw_after = raw_run()
        images.clear()  # the decoded photos are not needed any more
        text_s, image_s = min(raw_before[0], raw_after[0]), min(raw_before[1], raw_after[1])
        raw_s = min(sum(raw_before), sum(raw_after))
    if summary.failed:
        log.warning("bench index: %d products failed: %s", summary.failed, summary.errors[:3])
    return {
        "machine": machine_info(),
        "products": n,
        "indexed": summary.indexed,
        "failed": summary.failed,
        "via": via,
        "device": enc.text.device,
        "text_backend": settings.text_backend,
        "batch_size": batch_size,
        "text_docs_per_s": round(n / text_s, 1),
        "image_docs_per_s": round(n / image_s, 1),
        "image_decode_docs_per_s": round(n / decode_s, 1),
        "raw_encoder_docs_per_s": round(n / raw_s, 1),
        "pipeline_docs_per_s": round(n / pipeline_s, 1),
        "overhead_pct": round(100.0 * (pipeline_s - raw_s) / raw_s, 1),
        "raw_encoder_s": round(raw_s, 2),
        "raw_encoder_s_runs": [round(sum(raw_before), 2), round(sum(raw_after), 2)],
        "pipeline_s": round(pipeline_s, 2),
        "mapping": settings.mapping,
        "attribute_model": job.attribute_model,
        "photo_attribute_docs_per_s": round(n / attr_s, 1) if attr_s else None,
        # the attribute model reads region features: the forward pass with the maps pooled over the product (it
        # replaces the plain image encoding; compare with image_docs_per_s)
        "region_docs_per_s": round(n / regions_s, 1) if regions_s else None,
    }
