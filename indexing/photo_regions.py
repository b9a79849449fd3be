"""Where the product is: the image model's feature maps pooled over the product only, and its perceptual colours.

The pooled image vector (``image_vec``) averages the whole 7 x 7 feature map: backdrop, a model's face and the floor
weigh as much as the product, which is why a head on it confuses a white shirt on white with white and a print with
its background. The colour head therefore also reads (:func:`region_features`):

1. the **product mask**: the background separation of :func:`indexing.photo_features.foreground_mask` (pixels
   farther than ``FOREGROUND_DELTA_E`` in CIELAB from the border's median colour) on the very crop the image model
   saw, at :data:`SIDE` x :data:`SIDE`;
2. **masked pooling**: each chosen feature map (the outputs of EfficientNet blocks :data:`BLOCKS`, earlier blocks
   being more colour-sensitive, and the last 1280-channel map) averaged with the share of product in each cell as
   weight; they come out of the forward pass indexing runs anyway for ``image_vec``
   (:meth:`indexing.encoders.ImageEncoder.encode_maps`), so they cost no second pass;
3. the product's **CIELAB statistics** (:func:`lab_colour_features`): a histogram with soft (trilinear) assignment
   over a Lab grid, a hue histogram weighted by chroma in three lightness bands plus a lightness histogram of the
   achromatic pixels (black / grey / white), and the mean and spread of L, a, b.

Nothing here is trained; :mod:`indexing.photo_attributes` trains the heads. A change to the recipe changes
:data:`REGION_RECIPE`, which attribute models record and check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

SIDE = 56  # the mask's and the colour statistics' resolution (divides the 28, 14 and 7 cell maps)
BLOCKS: tuple[int, ...] = (2, 3, 4, 5, 6)  # EfficientNet blocks whose outputs are pooled over the product (28, 14, 14, 7, 7 cells)
REGION_RECIPE = "regions-v1"
#: the soft Lab histogram's grid: L 0..100 in 6 nodes, a and b -64..64 in 9 nodes
L_NODES, AB_NODES, AB_RANGE = 6, 9, 64.0
HUE_BINS, L_BANDS, GREY_BINS = 16, 3, 8
CHROMA_FULL = 30.0  # a pixel with chroma >= this counts fully as coloured, 0 as achromatic (linear between)
LAB_DIM = L_NODES * AB_NODES * AB_NODES + HUE_BINS * L_BANDS + GREY_BINS + 7  # 549


def _grid_index(v: np.ndarray, lo: float, hi: float, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.clip((v - lo) / (hi - lo) * (nodes - 1), 0.0, nodes - 1 - 1e-6)
    i = np.floor(t).astype(np.int64)
    return i, t - i


def lab_colour_features(lab: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``(LAB_DIM,)`` float32 colour statistics of an ``(h, w, 3)`` Lab image's pixels weighted by ``weight``
    (``(h, w)``, e.g. the product mask): soft Lab histogram (square-rooted shares), chroma-weighted hue histogram per
    lightness band and achromatic lightness histogram (shares), weighted mean and standard deviation of L, a, b and
    the weight's mean (the product's share of the photo)."""
    px = lab.reshape(-1, 3).astype(np.float64)
    w = np.asarray(weight, dtype=np.float64).ravel()
    if w.sum() <= 0:
        w = np.ones_like(w)
    tot = w.sum()
    L, a, b = px[:, 0], px[:, 1], px[:, 2]
    axes = [_grid_index(L, 0.0, 100.0, L_NODES), _grid_index(a, -AB_RANGE, AB_RANGE, AB_NODES),
            _grid_index(b, -AB_RANGE, AB_RANGE, AB_NODES)]
    shape = (L_NODES, AB_NODES, AB_NODES)
    hist = np.zeros(int(np.prod(shape)))
    for dl in (0, 1):
        for da in (0, 1):
            for db in (0, 1):
                part = w.copy()
                idx = []
                for (i, f), d in zip(axes, (dl, da, db)):
                    part *= f if d else 1.0 - f
                    idx.append(i + d)
                hist += np.bincount(np.ravel_multi_index(idx, shape), weights=part, minlength=hist.size)
    hist = np.sqrt(hist / tot)
    chroma = np.hypot(a, b)
    coloured = np.clip(chroma / CHROMA_FULL, 0.0, 1.0)
    t = (np.arctan2(b, a) + np.pi) / (2 * np.pi) * HUE_BINS
    h0 = np.floor(t).astype(np.int64) % HUE_BINS
    f = t - np.floor(t)
    band = np.clip((L / 100.0 * L_BANDS).astype(np.int64), 0, L_BANDS - 1)
    cw = w * coloured
    hue = (np.bincount(band * HUE_BINS + h0, weights=cw * (1 - f), minlength=L_BANDS * HUE_BINS)
           + np.bincount(band * HUE_BINS + (h0 + 1) % HUE_BINS, weights=cw * f, minlength=L_BANDS * HUE_BINS))
    gi, gf = _grid_index(L, 0.0, 100.0, GREY_BINS)
    gw = w * (1.0 - coloured)
    grey = np.bincount(gi, weights=gw * (1 - gf), minlength=GREY_BINS) + np.bincount(gi + 1, weights=gw * gf, minlength=GREY_BINS)
    mean = (px * w[:, None]).sum(0) / tot
    std = np.sqrt(((px - mean) ** 2 * w[:, None]).sum(0) / tot)
    scale = np.asarray([100.0, AB_RANGE, AB_RANGE])
    moments = np.concatenate([mean / scale, std / scale, [float(np.mean(weight))]])
    return np.concatenate([hist, hue / tot, grey / tot, moments]).astype(np.float32)


def _cell_weights(mask: np.ndarray, cells: int) -> np.ndarray:
    """The share of product in each of ``cells`` x ``cells`` cells of a ``(SIDE, SIDE)`` mask."""
    if SIDE % cells:
        raise ValueError(f"a {cells} x {cells} feature map does not tile the {SIDE} x {SIDE} mask")
    k = SIDE // cells
    return mask.reshape(cells, k, cells, k).mean(axis=(1, 3))


def masked_means(maps: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Each ``(C, h, w)`` map of one photo averaged over its cells with the product's share of the cell as weight."""
    out = []
    for fm in maps:
        wc = _cell_weights(mask, fm.shape[-1]).astype(np.float32)
        out.append((fm * wc).sum(axis=(1, 2)) / max(float(wc.sum()), 1e-6))
    return np.concatenate(out).astype(np.float32)


def _crop_mask_and_lab(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from skimage.color import rgb2lab

    from indexing.photo_features import foreground_mask

    h, w, _ = crop.shape
    if (h, w) != (SIDE, SIDE):
        small = crop.reshape(SIDE, h // SIDE, SIDE, w // SIDE, 3).mean(axis=(1, 3)) if not (h % SIDE or w % SIDE) else _resize(crop, SIDE)
    else:
        small = crop
    lab = rgb2lab(small).astype(np.float32)
    fg, _ = foreground_mask(lab)
    return fg.astype(np.float32), lab


def product_mask(crop: np.ndarray) -> np.ndarray:
    """The ``(SIDE, SIDE)`` bool product mask of an RGB crop in 0..1 (the crop the image model saw)."""
    return _crop_mask_and_lab(crop)[0] > 0.5


def _resize(crop: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray((np.clip(crop, 0, 1) * 255).astype(np.uint8))
    return np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def region_dim(channels: Sequence[int]) -> int:
    """The length of :func:`region_features`' rows for maps of these channel counts."""
    return int(sum(channels)) + LAB_DIM


@dataclass(frozen=True)
class RegionInputs:
    """What one forward pass gives the heads that read where the product is: the :func:`region_features` rows and,
    for an attribute model with a fine-tuned branch (:mod:`indexing.photo_finetune`), the output of the image model's
    block ``block`` (``(n, C, h, w)`` float32) with the product masks (``(n, SIDE, SIDE)`` bool)."""

    features: np.ndarray
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    block: int | None = None


def region_inputs(encoder: Any, images: Sequence[Any], *, blocks: Sequence[int] = BLOCKS, keep_block: int | None = None,
                  batch_size: int = 32) -> tuple[np.ndarray, RegionInputs]:
    """``(image vectors (n, dim) exactly as encoder.encode gives them, RegionInputs)`` of decoded PIL photos from one
    forward pass: the region features (the masked means of the maps of ``blocks`` and of the last map, then
    :func:`lab_colour_features` of the product) and, with ``keep_block`` (one of ``blocks``), that block's output and
    the product masks."""
    if keep_block is not None and keep_block not in blocks:
        raise ValueError(f"keep_block {keep_block} is not one of the hooked blocks {tuple(blocks)}")
    vecs, feats, kept, masks = [], [], [], []
    for v, crops, maps in encoder.encode_maps(images, blocks=tuple(blocks), batch_size=batch_size, crop_side=SIDE):
        vecs.append(v)
        if keep_block is not None:
            kept.append(np.ascontiguousarray(maps[list(blocks).index(keep_block)]))
        for j in range(len(v)):
            mask, lab = _crop_mask_and_lab(crops[j])
            masks.append(mask > 0.5)
            feats.append(np.concatenate([masked_means([m[j] for m in maps], mask), lab_colour_features(lab, mask)]))
    if not vecs:
        return np.zeros((0, encoder.dim), np.float32), RegionInputs(np.zeros((0, 0), np.float32))
    if keep_block is None:
        return np.concatenate(vecs), RegionInputs(np.stack(feats))
    return np.concatenate(vecs), RegionInputs(np.stack(feats), np.concatenate(kept), np.stack(masks), keep_block)


def region_features(encoder: Any, images: Sequence[Any], *, blocks: Sequence[int] = BLOCKS,
                    batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``(image vectors (n, dim) exactly as encoder.encode gives them, region features (n, region_dim))`` of decoded
    PIL photos from one forward pass (:func:`region_inputs` without a kept block)."""
    vecs, inputs = region_inputs(encoder, images, blocks=blocks, batch_size=batch_size)
    return vecs, inputs.features


__all__ = ["BLOCKS", "LAB_DIM", "REGION_RECIPE", "SIDE", "lab_colour_features", "masked_means", "product_mask", "region_dim", "region_features",
           "region_inputs", "RegionInputs"]
