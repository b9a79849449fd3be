"""A catalog's photographed products as training data for the photo attribute heads (:mod:`indexing.photo_attributes`).

Features are cached on disk under ``cache_dir/features`` keyed by product ids and photo paths: the pooled image
vectors through :func:`rerank.model.alignment.cached_image_features` (shared with the alignment's cache), the pixel colour
features beside them, the region features (:mod:`indexing.photo_regions`) of the photos a region-reading head
has a label for. Labels are the catalog's own values (empty where the catalog withholds one).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from indexing import fields as F
from indexing.errors import CatalogError, ImageError
from indexing.photo_attributes import ATTRIBUTES, AttributeConfig, AttributeModel, LabelledPhotos, train_attribute_model

log = logging.getLogger(__name__)


def _pixel_cache(cache_dir: Path, keys: list[str]) -> Path:
    from indexing.photo_features import PIXEL_DIM
    from rerank.model.alignment import _cache_file

    return _cache_file(cache_dir, f"pixel-v1_{PIXEL_DIM}", keys)


def cached_pixel_features(paths: list[Path], keys: list[str], *, cache_dir: Path | None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, PIXEL_DIM), ok (n,))`` of the photos at ``paths`` (cached by ``keys``)."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from indexing.images import load_image
    from indexing.photo_features import PIXEL_DIM, pixel_features

    path = _pixel_cache(cache_dir, keys) if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            if z["vectors"].shape == (len(keys), PIXEL_DIM):
                return z["vectors"].astype(np.float32), z["ok"].astype(bool)
    out = np.zeros((len(keys), PIXEL_DIM), dtype=np.float32)
    ok = np.zeros(len(keys), dtype=bool)
    with threadpool_limits(1):  # k-means on 2,000 points: threads only add overhead
        for i, p in enumerate(tqdm(paths, desc="pixel features", unit="img", disable=not progress, file=sys.stderr)):
            try:
                out[i] = pixel_features(load_image(p.name, p.parent))
                ok[i] = True
            except ImageError as e:
                log.warning("%s: photo skipped: %s", p, e)
    _save_cached(path, out, ok)
    return out, ok


def _save_cached(path: Path | None, vectors: np.ndarray, ok: np.ndarray) -> None:
    """Write a feature cache file atomically (a temporary file, then a rename); ``None``: no cache."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, vectors=vectors, ok=ok)
    tmp.replace(path)


def cached_region_features(paths: list[Path], keys: list[str], image_encoder: Any, *, cache_dir: Path | None,
                           blocks: tuple[int, ...], batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(region features (n, dim), ok (n,))`` of the photos at ``paths`` (:func:`indexing.photo_regions.region_features`,
    cached by ``keys``, the image model and the recipe)."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from indexing.images import load_image
    from indexing.photo_regions import REGION_RECIPE, region_features
    from rerank.model.alignment import _cache_file

    tag = f"{REGION_RECIPE}-b{'.'.join(map(str, blocks))}_{image_encoder.model_id}"
    path = _cache_file(cache_dir, tag, keys) if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            if len(z["ok"]) == len(keys):
                return z["vectors"].astype(np.float32), z["ok"].astype(bool)
    rows: list[np.ndarray | None] = [None] * len(keys)
    bar = tqdm(total=len(paths), desc="region features", unit="img", disable=not progress, file=sys.stderr)
    with threadpool_limits(1):
        for s in range(0, len(paths), batch_size):
            chunk, images = [], []
            for i in range(s, min(len(paths), s + batch_size)):
                try:
                    images.append(load_image(paths[i].name, paths[i].parent))
                    chunk.append(i)
                except ImageError as e:
                    log.warning("%s: photo skipped: %s", paths[i], e)
            if images:
                _, feats = region_features(image_encoder, images, blocks=blocks, batch_size=batch_size)
                for i, f in zip(chunk, feats):
                    rows[i] = f
            bar.update(min(len(paths), s + batch_size) - s)
    bar.close()
    ok = np.asarray([r is not None for r in rows], dtype=bool)
    dim = next((len(r) for r in rows if r is not None), 0)
    out = np.stack([r if r is not None else np.zeros(dim, np.float32) for r in rows]) if rows else np.zeros((0, 0), np.float32)
    _save_cached(path, out, ok)
    return out, ok


def load_labelled_photos(catalog: str | Path, images_root: str | Path | None, image_encoder: Any, *,
                         cache_dir: str | Path | None, preset: str | None = None, progress: bool = False,
                         region_heads: tuple[str, ...] = ("colour",), region_blocks: tuple[int, ...] | None = None) -> LabelledPhotos:
    """The catalog's products that have a readable photo, with pixel features, pooled image vectors and labels; and
    the region features of the photos labelled for an attribute of ``region_heads`` (``()``: none computed)."""
    from indexing.catalog import Product, preset_field_map, read_catalog
    from rerank.model.alignment import Pair, cached_image_features

    catalog = Path(catalog)
    root = Path(images_root if images_root is not None else catalog.parent).resolve()
    products = [p for p in read_catalog(catalog, field_map=preset_field_map(preset) if preset else None, images_root=root)
                if isinstance(p, Product) and p.image and "://" not in p.image]
    if not products:
        raise CatalogError(f"{catalog}: no product with a photo under {root}")
    pairs = [Pair(p.id, p.fields.get(F.TITLE, ""), root / p.image) for p in products]
    keys = [f"{q.product_id}\t{q.image_path}" for q in pairs]
    cache = Path(cache_dir) if cache_dir is not None else None
    pooled, ok_v = cached_image_features(pairs, image_encoder, cache_dir=cache, progress=progress)
    pixel, ok_p = cached_pixel_features([q.image_path for q in pairs], keys, cache_dir=cache, progress=progress)
    ok = ok_v & ok_p
    if not ok.all():
        log.warning("%d of %d photos could not be read (left out)", int((~ok).sum()), len(ok))
    keep = np.flatnonzero(ok)
    labels = {a: [str(products[i].fields.get(field) or "").strip() for i in keep] for a, field in ATTRIBUTES.items()}
    regions = info = None
    if region_heads:
        from indexing.photo_regions import BLOCKS, REGION_RECIPE

        blocks = tuple(BLOCKS if region_blocks is None else region_blocks)
        want = np.flatnonzero(np.any([np.asarray(labels[a]) != "" for a in region_heads], axis=0))
        feats, ok_r = cached_region_features([pairs[keep[i]].image_path for i in want], [keys[keep[i]] for i in want], image_encoder,
                                             cache_dir=cache, blocks=blocks, progress=progress)
        regions = np.zeros((len(keep), feats.shape[1]), dtype=np.float32)
        regions[want] = feats
        for i in want[~ok_r]:  # unreadable now (read once for the vector): no label rather than a row of zeros
            for a in region_heads:
                labels[a][i] = ""
        info = {"recipe": REGION_RECIPE, "blocks": list(blocks), "dim": int(feats.shape[1])}
    return LabelledPhotos([products[i].id for i in keep], pixel[keep], pooled[keep], labels, regions, info)


def train_from_catalog(catalog: str | Path, images_root: str | Path | None, image_encoder: Any, *, cache_dir: str | Path | None,
                       seed: int = 13, regions: bool = True, progress: bool = False) -> tuple[AttributeModel, LabelledPhotos]:
    """The heads trained on a catalog's labelled photos (:func:`load_labelled_photos` with the features their config
    reads, then :func:`indexing.photo_attributes.train_attribute_model`: a held-out share measured in the report) and
    those photos. ``regions=False``: no head reads region features (the version-1 recipe)."""
    cfg = AttributeConfig(seed=seed) if regions else AttributeConfig(seed=seed, region_heads=())
    data = load_labelled_photos(catalog, images_root if images_root is not None else Path(catalog).parent, image_encoder,
                                cache_dir=cache_dir, progress=progress, region_heads=cfg.region_heads)
    return train_attribute_model(data, image_encoder.model_id, cfg), data


__all__ = ["cached_pixel_features", "load_labelled_photos", "train_from_catalog"]
