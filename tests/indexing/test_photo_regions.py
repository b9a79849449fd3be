"""Region features: the feature maps pooled over the product only (the backdrop does not move them) and the product's
CIELAB colour statistics, from the same forward pass as the image vector."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from indexing.photo_regions import (
    GREY_BINS,
    HUE_BINS,
    L_BANDS,
    LAB_DIM,
    SIDE,
    lab_colour_features,
    masked_means,
    region_dim,
    region_features,
)

HIST = LAB_DIM - HUE_BINS * L_BANDS - GREY_BINS - 7  # where the hue histogram starts


def _square(colour, bg=(255, 255, 255), size=224, box=(70, 50, 154, 174)) -> Image.Image:
    im = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(im).rectangle(box, fill=colour)
    return im


def test_masked_means_read_the_product_cells_only():
    rng = np.random.default_rng(0)
    mask = np.zeros((SIDE, SIDE), dtype=np.float32)
    mask[16:40, 24:48] = 1.0  # whole cells of a 7 x 7 map (8 px each): rows 2..4, columns 3..5
    fm = rng.normal(size=(5, 7, 7)).astype(np.float32)
    got = masked_means([fm], mask)
    assert np.allclose(got, fm[:, 2:5, 3:6].mean(axis=(1, 2)), atol=1e-5)
    other = fm.copy()
    other[:, :2] += 100.0  # the backdrop's cells change: the product's pooled features do not
    assert np.allclose(masked_means([other], mask), got, atol=1e-5)
    assert not np.allclose(other.mean(axis=(1, 2)), fm.mean(axis=(1, 2)))
    # a mask cell half covered weighs half
    half = np.zeros((SIDE, SIDE), dtype=np.float32)
    half[0:8, 0:4] = 1.0
    half[0:8, 8:16] = 1.0
    assert np.allclose(masked_means([fm], half), (0.5 * fm[:, 0, 0] + fm[:, 0, 1]) / 1.5, atol=1e-5)
    with pytest.raises(ValueError, match="does not tile"):
        masked_means([rng.normal(size=(2, 5, 5))], mask)


def test_lab_colour_features_separate_hues_and_ignore_unweighted_pixels():
    from skimage.color import rgb2lab

    def lab(colour, bg=(255, 255, 255)):
        return rgb2lab(np.asarray(_square(colour, bg, size=SIDE, box=(16, 12, 40, 44)), dtype=np.float32) / 255.0)

    mask = np.zeros((SIDE, SIDE), dtype=np.float32)
    mask[12:45, 16:41] = 1.0
    red, blue = lab_colour_features(lab((200, 20, 30)), mask), lab_colour_features(lab((20, 30, 160)), mask)
    assert red.shape == (LAB_DIM,) and np.isfinite(red).all()
    hue_red = red[HIST:HIST + HUE_BINS * L_BANDS].reshape(L_BANDS, HUE_BINS).sum(0)
    hue_blue = blue[HIST:HIST + HUE_BINS * L_BANDS].reshape(L_BANDS, HUE_BINS).sum(0)
    assert abs(int(np.argmax(hue_red)) - int(np.argmax(hue_blue))) >= 3  # different hue bins
    assert hue_red.sum() > 0.9  # a saturated product: nearly all of its weight is chromatic
    # the backdrop has no weight: on grey or on white, the product's statistics are the same
    assert np.allclose(lab_colour_features(lab((200, 20, 30), bg=(128, 128, 128)), mask), red, atol=1e-5)
    # black, grey and white products land in the achromatic lightness histogram, in order
    grey = HIST + HUE_BINS * L_BANDS
    peaks = [int(np.argmax(lab_colour_features(lab(c, bg=(0, 90, 0)), mask)[grey:grey + GREY_BINS])) for c in ((10, 10, 10), (128, 128, 128), (245, 245, 245))]
    assert peaks[0] < peaks[1] < peaks[2]


@pytest.mark.slow
def test_region_features_come_from_the_encoders_pass_and_do_not_follow_the_backdrop():
    from indexing.encoders import get_image_encoder
    from indexing.photo_regions import BLOCKS

    enc = get_image_encoder("efficientnet_lite0", device="cpu")
    ims = [_square((180, 30, 40), bg=(255, 255, 255)), _square((180, 30, 40), bg=(200, 220, 240)), _square((30, 60, 170))]
    vecs, feats = region_features(enc, ims, batch_size=2)
    assert np.allclose(vecs, enc.encode(ims), atol=1e-5)  # the image vectors are exactly encode()'s
    channels = [int(enc._model.blocks[i][-1].conv_pwl.out_channels) for i in BLOCKS] + [enc.dim]
    assert feats.shape == (3, region_dim(channels)) and np.isfinite(feats).all()
    head = slice(sum(channels[:-1]), sum(channels))
    # the head part = the last feature map averaged over the product's cells (the mask of the crop the model saw)
    from indexing.photo_regions import _crop_mask_and_lab

    x = enc.preprocess(ims)
    fmap = enc._model.forward_features(x).detach().numpy()
    crops = (x.numpy() * 0.5 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
    for j in range(3):
        mask, _ = _crop_mask_and_lab(crops[j])
        assert 0.1 < mask.mean() < 0.5  # the square, not the backdrop
        assert np.allclose(feats[j, head], masked_means([fmap[j]], mask), rtol=1e-3, atol=1e-3)
        assert not np.allclose(feats[j, head], fmap[j].mean(axis=(1, 2)), rtol=1e-2, atol=1e-2)
    # the same red product on two backdrops: its colour statistics hardly move, while a blue product's differ
    lab = slice(sum(channels), None)
    assert np.linalg.norm(feats[0, lab] - feats[1, lab]) < 0.2 * np.linalg.norm(feats[0, lab] - feats[2, lab])
