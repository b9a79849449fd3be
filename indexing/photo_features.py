"""What the attribute heads read off a product photo's pixels: colour features in a perceptual space.

**Pixel colour** (:func:`pixel_features`, model-free, about 10 ms a photo on one core):

1. the photo is resized to :data:`SIDE` x :data:`SIDE` and converted to CIELAB (scikit-image's ``rgb2lab``), a
   perceptual space where distances follow what a shopper sees;
2. the **background** is the median Lab colour of the border pixels (studio photos sit on a plain backdrop); a
   pixel farther than :data:`FOREGROUND_DELTA_E` from it is the product (all pixels when too few differ: a
   white shirt on white);
3. the **dominant colours**: scikit-learn's k-means (:data:`K` clusters) over the foreground's Lab pixels,
   weighted by a centred Gaussian (the product sits in the middle; a model's face and the floor do not); the
   clusters, heaviest first, give ``weight, L, a, b, chroma``;
4. a centre-weighted **Lab histogram** of the foreground (square-rooted), the foreground's share of the photo
   and the background's colour.

Nothing here is trained; :mod:`indexing.photo_attributes` trains the heads on these and the pooled image vector.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

SIDE = 48  # pixels per side for the pixel features
FOREGROUND_DELTA_E = 12.0  # Lab distance from the background above which a pixel is the product's
MIN_FOREGROUND = 40  # fewer foreground pixels than this: the whole photo counts
K = 4  # dominant colours
L_BINS, AB_BINS, AB_RANGE = 5, 8, 64.0  # Lab histogram: L over 0..100, a and b over -64..64 (clipped)
PIXEL_DIM = K * 5 + L_BINS * AB_BINS * AB_BINS + 4  # 344
FG_SHARE_INDEX = K * 5 + L_BINS * AB_BINS * AB_BINS  # where pixel_features keeps the foreground's share of the photo
MIN_OBJECT_SHARE = 0.03  # a connected foreground region counts as an object from this share of the photo

_yy, _xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
_c = (SIDE - 1) / 2
_CENTRE = np.exp(-(((_yy - _c) / (SIDE * 0.36)) ** 2 + ((_xx - _c) / (SIDE * 0.29)) ** 2)).astype(np.float32)


def _rgb_array(image: Any, side: int) -> np.ndarray:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image, got {type(image).__name__}")
    im = image if image.mode == "RGB" else image.convert("RGB")
    return np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def foreground_mask(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, background_lab)`` of an ``(h, w, 3)`` Lab image: pixels far from the border's median colour."""
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    bg = np.median(border, axis=0)
    fg = np.linalg.norm(lab - bg, axis=2) > FOREGROUND_DELTA_E
    if int(fg.sum()) < MIN_FOREGROUND:
        fg = np.ones_like(fg)
    return fg, bg


def pixel_features(image: Any) -> np.ndarray:
    """The ``(PIXEL_DIM,)`` float32 pixel colour features of a PIL image (see the module docstring)."""
    from skimage.color import rgb2lab
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    lab = rgb2lab(_rgb_array(image, SIDE)).astype(np.float32)
    fg, bg = foreground_mask(lab)
    w = (_CENTRE * fg).ravel()
    px = lab.reshape(-1, 3)
    keep = w > 1e-3
    pts, pw = px[keep], w[keep]
    if len(pts) < K:  # degenerate (a tiny centred blob): the whole photo
        pts, pw = px, np.ones(len(px), dtype=np.float32)
    with warnings.catch_warnings():  # a flat-coloured product has fewer distinct colours than K: fine, empty clusters weigh 0
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=K, n_init=1, max_iter=30, random_state=0).fit(pts, sample_weight=pw)
    cw = np.bincount(km.labels_, weights=pw, minlength=K)
    cw = cw / max(cw.sum(), 1e-12)
    order = np.argsort(-cw, kind="stable")
    dom = []
    for i in order:
        L, a, b = km.cluster_centers_[i]
        dom.extend([cw[i], L / 100.0, a / AB_RANGE, b / AB_RANGE, np.hypot(a, b) / AB_RANGE])
    li = np.clip((px[:, 0] / 100.0 * L_BINS).astype(np.int64), 0, L_BINS - 1)
    ai = np.clip(((px[:, 1] + AB_RANGE) / (2 * AB_RANGE) * AB_BINS).astype(np.int64), 0, AB_BINS - 1)
    bi = np.clip(((px[:, 2] + AB_RANGE) / (2 * AB_RANGE) * AB_BINS).astype(np.int64), 0, AB_BINS - 1)
    h = np.bincount((li * AB_BINS + ai) * AB_BINS + bi, weights=w, minlength=L_BINS * AB_BINS * AB_BINS)
    h = np.sqrt(h / max(h.sum(), 1e-12))
    extra = [float(fg.mean()), bg[0] / 100.0, bg[1] / AB_RANGE, bg[2] / AB_RANGE]
    return np.concatenate([np.asarray(dom, dtype=np.float32), h.astype(np.float32), np.asarray(extra, dtype=np.float32)])


def object_count(image: Any) -> int:
    """How many separate objects (connected foreground regions of at least :data:`MIN_OBJECT_SHARE` of the photo)
    a photo shows: 1 for a product, 2 for a pair of shoes, more for a collage of products; 0 when nothing stands
    out from the background."""
    from scipy import ndimage
    from skimage.color import rgb2lab

    lab = rgb2lab(_rgb_array(image, SIDE)).astype(np.float32)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    fg = np.linalg.norm(lab - np.median(border, axis=0), axis=2) > FOREGROUND_DELTA_E
    labels, n = ndimage.label(ndimage.binary_closing(fg, iterations=1))
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= MIN_OBJECT_SHARE * fg.size).sum())


__all__ = ["FG_SHARE_INDEX", "PIXEL_DIM", "foreground_mask", "object_count", "pixel_features"]
