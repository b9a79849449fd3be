"""The colours a product photo shows: a pixel colour histogram of its foreground, stored as ``image_colour``.

Pooled CNN features (``image_vec``) carry colour only partly: a softmax head on them names the catalog colour
of 53% of held-out fashion photos. The pixels carry it directly, so indexing also stores a small, model-free
colour descriptor of each photo:

1. the decoded photo is resized to :data:`SIDE` x :data:`SIDE` (bilinear);
2. the **background** is the median colour of the border pixels (product photos sit on a plain backdrop);
   pixels that differ from it by more than :data:`FOREGROUND_DELTA` in some channel are the foreground (all
   pixels when fewer than :data:`MIN_FOREGROUND` differ: a white shirt on white);
3. foreground pixels are weighted by a centred Gaussian (the product sits in the middle; a model's face and
   the floor do not) and counted in a joint RGB histogram of :data:`BINS`\\ :sup:`3` cells;
4. the descriptor is the **square root** of the normalized histogram. Its L2 norm is 1, so the inner product
   of two descriptors is their Bhattacharyya coefficient: the field is an ``innerproduct`` ``knn_vector``
   that can also find "products of this colour".

It is computed from the decoded image the indexer already holds (about 1 ms a photo). Nothing records which
recipe made a stored descriptor: a change to it (other than its dimension, which the mapping and the colour
head's inputs check) needs a new mapping version and a reindex, so that no index mixes two recipes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BINS = 6  # per RGB channel
DIM = BINS**3  # 216
SIDE = 56  # pixels per side after downscaling
FOREGROUND_DELTA = 0.12  # max |pixel - background| over the channels (0..1) above which a pixel is foreground
MIN_FOREGROUND = 30  # fewer foreground pixels than this: the whole photo counts
SIGMA_Y, SIGMA_X = 20.0, 16.0  # centre weighting, in pixels of the SIDE x SIDE image

_yy, _xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
_CENTRE = np.exp(-(((_yy - (SIDE - 1) / 2) / SIGMA_Y) ** 2 + ((_xx - (SIDE - 1) / 2) / SIGMA_X) ** 2)).astype(np.float32)


def colour_descriptor(image: Any) -> np.ndarray:
    """The ``(DIM,)`` float32 colour descriptor of a PIL image (any mode, any size); unit L2 norm."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"colour_descriptor takes a PIL.Image, got {type(image).__name__}")
    im = image
    if im.mode != "RGB":
        im = im.convert("RGBA" if "A" in im.getbands() or im.mode == "P" else "RGB")
        if im.mode == "RGBA":  # transparent backgrounds count as white, as a shop page would show them
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
    a = np.asarray(im.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    background = np.median(border, axis=0)
    fg = np.abs(a - background).max(axis=2) > FOREGROUND_DELTA
    if int(fg.sum()) < MIN_FOREGROUND:
        fg = np.ones_like(fg)
    w = (_CENTRE * fg).ravel()
    q = np.minimum((a.reshape(-1, 3) * BINS).astype(np.int64), BINS - 1)
    cell = (q[:, 0] * BINS + q[:, 1]) * BINS + q[:, 2]
    h = np.bincount(cell, weights=w, minlength=DIM)
    return np.sqrt(h / h.sum()).astype(np.float32)


__all__ = ["BINS", "DIM", "colour_descriptor"]
