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


def cached_block_maps(paths: list[Path], keys: list[str], image_encoder: Any, *, cache_dir: Path | None, block: int,
                      batch_size: int = 32, chunk: int = 256, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(maps (n, C, h, w) float16, masks (n, SIDE, SIDE) bool, ok (n,))``: the output of the image model's block
    ``block`` and the product mask (:mod:`indexing.photo_regions`) of the photos at ``paths``, from the forward pass
    :meth:`indexing.encoders.ImageEncoder.encode_maps` runs; what the fine-tuned colour branch
    (:mod:`indexing.photo_finetune`) trains on. Cached by ``keys``, the image model and the block, ``chunk`` photos a
    file, so an interrupted run resumes at its first missing chunk."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from indexing.images import load_image
    from indexing.photo_regions import REGION_RECIPE, SIDE, product_mask
    from rerank.model.alignment import _cache_file

    tag = f"maps-{REGION_RECIPE}-b{block}_{image_encoder.model_id}"
    base = _cache_file(cache_dir, tag, keys) if cache_dir is not None else None
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bar = tqdm(total=len(paths), desc=f"block {block} maps", unit="img", disable=not progress, file=sys.stderr)
    for c0 in range(0, len(paths), chunk):
        idx = range(c0, min(len(paths), c0 + chunk))
        path = base.with_name(f"{base.stem}-{c0 // chunk:04d}.npz") if base is not None else None
        if path is not None and path.is_file():
            try:
                with np.load(path) as z:
                    if len(z["ok"]) == len(idx):
                        parts.append((z["maps"], z["masks"], z["ok"]))
                        bar.update(len(idx))
                        continue
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable map cache %s (%s)", path, e)
        rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        with threadpool_limits(1):
            images, at = [], []
            for i in idx:
                try:
                    images.append(load_image(paths[i].name, paths[i].parent))
                    at.append(i)
                except ImageError as e:
                    log.warning("%s: photo skipped: %s", paths[i], e)
            for s in range(0, len(images), batch_size):
                for _, crops, maps in image_encoder.encode_maps(images[s:s + batch_size], blocks=(block,), batch_size=batch_size, crop_side=SIDE):
                    for j in range(len(crops)):
                        rows[at[s + j]] = (maps[0][j].astype(np.float16), product_mask(crops[j]))
        shape = next(iter(rows.values()))[0].shape if rows else (0, 0, 0)
        maps_c = np.stack([rows[i][0] if i in rows else np.zeros(shape, np.float16) for i in idx])
        masks_c = np.stack([rows[i][1] if i in rows else np.zeros((SIDE, SIDE), bool) for i in idx])
        ok_c = np.asarray([i in rows for i in idx], dtype=bool)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, maps=maps_c, masks=masks_c, ok=ok_c)
            tmp.replace(path)
        parts.append((maps_c, masks_c, ok_c))
        bar.update(len(idx))
    bar.close()
    if not parts:
        return np.zeros((0, 0, 0, 0), np.float16), np.zeros((0, SIDE, SIDE), bool), np.zeros(0, bool)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))


def load_labelled_photos(catalog: str | Path, images_root: str | Path | None, image_encoder: Any, *,
                         cache_dir: str | Path | None, preset: str | None = None, progress: bool = False,
                         region_heads: tuple[str, ...] = ("colour",), region_blocks: tuple[int, ...] | None = None,
                         maps_heads: tuple[str, ...] = (), maps_block: int | None = None) -> LabelledPhotos:
    """The catalog's products that have a readable photo, with pixel features, pooled image vectors and labels; the
    region features of the photos labelled for an attribute of ``region_heads`` (``()``: none computed); and the
    output of block ``maps_block`` with the product masks (:func:`cached_block_maps`) of the photos labelled for an
    attribute of ``maps_heads`` (what a fine-tuned branch trains on; ``()`` or no block: none)."""
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
    maps = masks = None
    if maps_heads and maps_block is not None:
        want = np.flatnonzero(np.any([np.asarray(labels[a]) != "" for a in maps_heads], axis=0))
        got, got_masks, ok_m = cached_block_maps([pairs[keep[i]].image_path for i in want], [keys[keep[i]] for i in want], image_encoder,
                                                 cache_dir=cache, block=maps_block, progress=progress)
        maps = np.zeros((len(keep), *got.shape[1:]), dtype=np.float16)
        masks = np.zeros((len(keep), *got_masks.shape[1:]), dtype=bool)
        maps[want], masks[want] = got, got_masks
        for i in want[~ok_m]:
            for a in maps_heads:
                labels[a][i] = ""
    return LabelledPhotos([products[i].id for i in keep], pixel[keep], pooled[keep], labels, regions, info, maps, masks,
                          maps_block if maps is not None else None)


def train_from_catalog(catalog: str | Path, images_root: str | Path | None, image_encoder: Any, *, cache_dir: str | Path | None,
                       seed: int = 13, regions: bool = True, finetune: bool = True, progress: bool = False,
                       finetune_epochs: int | None = None, finetune_lr: float | None = None,
                       calibrate: bool = True) -> tuple[AttributeModel, LabelledPhotos]:
    """The heads trained on a catalog's labelled photos (:func:`load_labelled_photos` with the features their config
    reads, then :func:`indexing.photo_attributes.train_attribute_model`: a held-out share measured in the report) and
    those photos. The colour head also gets a fine-tuned branch (version 3); ``finetune=False``: the version-2 recipe;
    ``regions=False``: no head reads region features nor has a branch (the version-1 recipe). ``finetune_epochs``,
    ``finetune_lr``: the branch's epochs and its copied blocks' learning rate (None: the recipe's defaults);
    ``calibrate=False``: the version-3 mix (no temperatures)."""
    from dataclasses import replace

    from indexing.photo_finetune import FROM_BLOCK

    cfg = AttributeConfig(seed=seed, calibrate=calibrate)
    if finetune_epochs is not None:
        cfg = replace(cfg, finetune_epochs=finetune_epochs)
    if finetune_lr is not None:
        cfg = replace(cfg, finetune_lr=finetune_lr)
    if not regions:
        cfg = replace(cfg, region_heads=(), finetune_heads=())
    elif not finetune:
        cfg = replace(cfg, finetune_heads=())
    data = load_labelled_photos(catalog, images_root if images_root is not None else Path(catalog).parent, image_encoder,
                                cache_dir=cache_dir, progress=progress, region_heads=cfg.region_heads,
                                maps_heads=cfg.finetune_heads, maps_block=FROM_BLOCK)
    return train_attribute_model(data, image_encoder.model_id, cfg, image_model=image_encoder.module), data


__all__ = ["cached_block_maps", "cached_pixel_features", "load_labelled_photos", "train_from_catalog"]
