"""Product attributes read from the photo: heads for colour, article type, gender and usage, trained on the catalog.

Each head is a multinomial logistic regression (scikit-learn, inputs standardized) over

* the photo's pixel colour features (:func:`indexing.photo_features.pixel_features`: dominant Lab colours of the
  product separated from its backdrop, a Lab histogram), and
* the pooled EfficientNet-Lite0 vector the index stores anyway (``image_vec``),
* for the heads named in ``AttributeConfig.region_heads`` (colour), the photo's **region features**
  (:mod:`indexing.photo_regions`: the image model's feature maps pooled over the product only, from the forward pass
  that makes ``image_vec``, and the product's CIELAB colour statistics),

trained on the catalog's own labelled products (a product whose attribute is empty teaches nothing; a class needs
``min_count`` examples), so every value a head can name is one the catalog used: no colour name is invented.
Accuracy is measured on held-out photos (:func:`evaluate_attributes`, ``fusionrank eval --attributes``).

**Bad input** earns low confidence rather than a confident guess (:func:`photo_quality`): a photo with no product
separable from its background (all backdrop), a photo unlike every training photo (a line drawing, a logo: its
image vector's best cosine to the training photos falls below the 1st percentile of real held-out photos'), and a
collage (several separate objects side by side). Such a photo's confidences are multiplied by 0, so nothing is
completed from it. A corrupt file never reaches the heads (the indexer refuses it first).

A head named in ``AttributeConfig.finetune_heads`` (colour) also gets a **fine-tuned branch**
(:mod:`indexing.photo_finetune`: a copy of the image model's last block and head convolution trained on the catalog's
labels, reading the output of an earlier block from the same forward pass); its probabilities are averaged with the
logistic regression's with a weight chosen on a validation split of the training photos; version 4 first puts each
at a softmax temperature fitted on that split, and the mix at a third (:func:`indexing.photo_finetune.combine`).

The model is a versioned directory: ``config.json`` (classes, each head's inputs, the image model id it was trained
with, the region recipe, the branch's recipe and weight, the held-out report) + ``weights.safetensors``. Version 3
has a fine-tuned branch (prediction runs it in torch); versions 1 (every head on pixel features + ``image_vec``) and
2 (region features, numpy only) still load and predict as they did; a model without a branch is saved as version 2,
one whose branch has no temperatures as version 3 (version 4: with them).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.errors import ConfigError, ModelArtifactError

log = logging.getLogger(__name__)

ATTRIBUTE_VERSION = 4
#: versions :meth:`AttributeModel.load` reads (1: every head on pixel features + image_vec; 2: + region features;
#: 3: + a fine-tuned branch; 4: + temperatures of the branch's mix)
READABLE_VERSIONS = (1, 2, 3, 4)
#: a head's input groups
PIXEL, IMAGE_VEC, REGIONS = "pixel", "image_vec", "regions"
BASE_INPUTS = (PIXEL, IMAGE_VEC)
#: attribute name -> the catalog field it completes
ATTRIBUTES: dict[str, str] = {"colour": F.COLOUR, "article_type": F.ARTICLE_TYPE, "gender": F.GENDER, "usage": F.USAGE}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
#: reasons :func:`photo_quality` gives for distrusting a photo
NO_PRODUCT, UNFAMILIAR, COLLAGE = "no product separable from the background", "unlike the catalog's photos", "several objects (collage)"


@dataclass(frozen=True)
class AttributeConfig:
    min_count: int = 5  # a value needs this many labelled training photos to be a class
    holdout: float = 0.2  # share of labelled photos held out for the report
    # inverse L2 strength of the logistic regressions (inputs standardized); measured on the fashion benchmark catalog
    C: float = 0.05
    max_iter: int = 200
    seed: int = 13
    novelty_sample: int = 2000  # training image vectors kept for the unfamiliar-photo check
    novelty_quantile: float = 0.01  # held-out real photos below this quantile of best cosine count as unfamiliar
    # heads that also read the region features (indexing.photo_regions) when the training data carries them
    region_heads: tuple[str, ...] = ("colour",)
    # heads that also get a fine-tuned branch (indexing.photo_finetune) when the training data carries the block maps
    # and the head reads the region features (the maps come from that pass); others are left as they are
    finetune_heads: tuple[str, ...] = ("colour",)
    finetune_val: float = 0.15  # share of the training photos the branch is early-stopped and weighted on
    # the branch's epochs (its one-cycle schedule spans them), early-stopping patience and the copied blocks' peak
    # learning rate: the version-3 recipe. 10, 3, 1e-3 scored the same on held-out fashion photos within noise
    # (0.6865 / 0.8798 against 0.6845 / 0.8787, both calibrated; docs/benchmarks.md), trained up to 67% longer and, on
    # a 360-photo catalog, left the branch at the most common colour: kept as an option for large catalogs
    finetune_epochs: int = 6
    finetune_patience: int = 2
    finetune_lr: float = 3e-4
    # fit softmax temperatures of the regression, the branch and their mix on the validation split (version 4);
    # False: the version-3 mix (every temperature 1)
    calibrate: bool = True

    def __post_init__(self) -> None:
        if set(self.region_heads) - set(ATTRIBUTES):
            raise ConfigError(f"region_heads {self.region_heads}: valid attributes are {', '.join(ATTRIBUTES)}")
        if set(self.finetune_heads) - set(ATTRIBUTES):
            raise ConfigError(f"finetune_heads {self.finetune_heads}: valid attributes are {', '.join(ATTRIBUTES)}")
        if not 0.0 < self.finetune_val < 0.5:
            raise ConfigError(f"finetune_val must be in (0, 0.5), got {self.finetune_val!r}")
        if self.finetune_epochs < 1 or self.finetune_patience < 1 or not self.finetune_lr > 0:
            raise ConfigError(f"finetune_epochs and finetune_patience must be at least 1 and finetune_lr positive, got "
                              f"{self.finetune_epochs!r}, {self.finetune_patience!r}, {self.finetune_lr!r}")
        if self.min_count < 1 or not 0.0 < self.holdout < 1.0 or self.C <= 0 or self.max_iter < 1 or not 0 <= self.novelty_quantile < 0.5:
            raise ConfigError(f"bad attribute config {self}")


@dataclass(frozen=True)
class AttributeHead:
    """One attribute's softmax regression over its standardized inputs (``[pixel features, image_vec]``, then the
    region features where ``inputs`` names them)."""

    name: str
    classes: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (classes, inputs)
    bias: np.ndarray  # (classes,)
    inputs: tuple[str, ...] = BASE_INPUTS
    #: :class:`indexing.photo_finetune.Branch` whose probabilities are averaged in (None: the regression alone)
    branch: Any = None

    def proba(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.scale) @ self.weight.T + self.bias
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    """A photo's predicted value of one attribute: ``value`` None when the photo was distrusted."""

    value: str | None
    confidence: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class AttributeModel:
    heads: dict[str, AttributeHead]
    image_model_id: str
    pixel_dim: int
    novelty_bank: np.ndarray  # (m, image dim) unit vectors of training photos
    novelty_threshold: float
    report: dict[str, Any] = field(default_factory=dict)
    #: ``{"recipe", "blocks", "dim"}`` of the region features some head reads (None: no head reads them)
    regions: dict[str, Any] | None = None

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.heads)

    @property
    def needs_regions(self) -> bool:
        return any(REGIONS in h.inputs for h in self.heads.values())

    @property
    def branch_block(self) -> int | None:
        """The image model block whose output a fine-tuned branch reads (None: no branch)."""
        return next((h.branch.from_block for h in self.heads.values() if h.branch is not None), None)

    def features(self, pixel: np.ndarray, image_vec: np.ndarray, regions: np.ndarray | None = None, *,
                 inputs: Sequence[str] = BASE_INPUTS) -> np.ndarray:
        """The rows a head with these ``inputs`` reads: ``[pixel, image_vec]`` (+ ``regions``)."""
        pixel = np.asarray(pixel, dtype=np.float32).reshape(len(pixel), -1)
        image_vec = np.asarray(image_vec, dtype=np.float32).reshape(len(image_vec), -1)
        if pixel.shape[1] != self.pixel_dim:
            raise ModelArtifactError(f"attribute model expects {self.pixel_dim} pixel features, got {pixel.shape[1]}")
        if image_vec.shape[1] != self.novelty_bank.shape[1]:
            raise ModelArtifactError(f"attribute model expects {self.novelty_bank.shape[1]}-d image vectors, got {image_vec.shape[1]}")
        parts = [pixel, image_vec]
        if REGIONS in inputs:
            if regions is None:
                raise ModelArtifactError("this attribute model's heads read the photo's region features (indexing.photo_regions): "
                                         "pass them, or the image encoder to compute them (predict_images(..., encoder=))")
            regions = np.asarray(getattr(regions, "features", regions), dtype=np.float32).reshape(len(pixel), -1)
            want = int((self.regions or {}).get("dim", -1))
            if regions.shape[1] != want:
                raise ModelArtifactError(f"attribute model expects {want} region features, got {regions.shape[1]}")
            parts.append(regions)
        return np.concatenate(parts, axis=1)

    def familiarity(self, image_vec: np.ndarray) -> np.ndarray:
        """Best cosine of each image vector to the training photos kept in the model."""
        v = np.asarray(image_vec, dtype=np.float32)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return (v @ self.novelty_bank.T).max(axis=1)

    def predict(self, pixel: np.ndarray, image_vec: np.ndarray, *, regions: Any = None,
                objects: Sequence[int] | None = None, top_k: int = 3) -> list[dict[str, Prediction]]:
        """Per photo ``{attribute: Prediction}``; a distrusted photo (:func:`photo_quality`) gets value None and
        confidence 0 (its ``top`` still says what the heads saw). ``objects``: per photo
        :func:`indexing.photo_features.object_count` (collages are distrusted only when given). ``regions``: the
        photos' :func:`indexing.photo_regions.region_features` (needed when :attr:`needs_regions`), as
        :class:`indexing.photo_regions.RegionInputs` with the block maps where a head has a fine-tuned branch."""
        xs = {h.inputs: self.features(pixel, image_vec, regions, inputs=h.inputs) for h in self.heads.values()}
        n = len(np.asarray(pixel))
        objs = list(objects) if objects is not None else [None] * n
        trust = np.asarray([photo_quality(p, f, self.novelty_threshold, o) is None
                            for p, f, o in zip(np.asarray(pixel), self.familiarity(image_vec), objs)])
        out: list[dict[str, Prediction]] = [{} for _ in range(n)]
        for name, head in self.heads.items():
            p = head.proba(xs[head.inputs])
            if head.branch is not None:
                from indexing.photo_finetune import combine

                if getattr(regions, "maps", None) is None or regions.block != head.branch.from_block:
                    raise ModelArtifactError(f"this attribute model's {name} head has a fine-tuned branch that reads the output of image "
                                             f"model block {head.branch.from_block}: pass regions as RegionInputs with those maps "
                                             "(indexing.photo_attributes.image_vectors), or the image encoder to predict_images(..., encoder=)")
                p = combine(p, head.branch.proba(regions.maps, regions.masks), head.branch)
            order = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
            for i in range(n):
                top = tuple((head.classes[j], float(p[i, j])) for j in order[i])
                if trust[i]:
                    out[i][name] = Prediction(top[0][0], top[0][1], top)
                else:
                    out[i][name] = Prediction(None, 0.0, top)
        return out

    @property
    def version(self) -> int:
        """The oldest format that holds this model, so that older code reads it where it can: 4 with a calibrated
        branch (temperatures), 3 with a branch, else 2."""
        branches = [h.branch for h in self.heads.values() if h.branch is not None]
        if any(b.calibrated for b in branches):
            return ATTRIBUTE_VERSION
        return 3 if branches else 2

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"novelty_bank": self.novelty_bank.astype(np.float16)}
        for name, h in self.heads.items():
            for part in ("mean", "scale", "weight", "bias"):
                tensors[f"{name}.{part}"] = np.ascontiguousarray(getattr(h, part), dtype=np.float32)
            if h.branch is not None:
                tensors.update(h.branch.tensors(f"{name}.branch."))
        save_file(tensors, str(d / WEIGHTS_FILE))
        config = {
            "kind": "fusionrank-photo-attributes",
            "version": self.version,
            "image_model_id": self.image_model_id,
            "pixel_dim": self.pixel_dim,
            "novelty_threshold": self.novelty_threshold,
            "heads": {name: {"field": ATTRIBUTES[name], "classes": list(h.classes), "inputs": list(h.inputs),
                             **({"branch": h.branch.config()} if h.branch is not None else {})}
                      for name, h in self.heads.items()},
            "regions": self.regions,
            "report": self.report,
        }
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "AttributeModel":
        from safetensors.numpy import load_file

        d = Path(directory)
        try:
            config = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
            tensors = load_file(str(d / WEIGHTS_FILE))
        except FileNotFoundError as e:
            raise ModelArtifactError(f"attribute model {str(d)!r} is incomplete: {e.filename} is missing") from None
        except (OSError, ValueError) as e:
            raise ModelArtifactError(f"attribute model {str(d)!r} cannot be read: {e}") from None
        if config.get("kind") != "fusionrank-photo-attributes" or config.get("version") not in READABLE_VERSIONS:
            raise ModelArtifactError(f"{str(d)!r} is not a photo attribute model of version {' or '.join(map(str, READABLE_VERSIONS))} "
                                     f"(found version {config.get('version')!r}): retrain it with `fusionrank attributes train`")
        regions = config.get("regions")
        if regions is not None:
            from indexing.photo_regions import REGION_RECIPE

            if regions.get("recipe") != REGION_RECIPE:
                raise ModelArtifactError(f"attribute model {str(d)!r} reads region features of recipe {regions.get('recipe')!r}; "
                                         f"this version computes {REGION_RECIPE!r}: retrain it with `fusionrank attributes train`")
        heads = {}
        for name, h in config["heads"].items():
            if name not in ATTRIBUTES:
                raise ModelArtifactError(f"attribute model {str(d)!r} has an unknown head {name!r}")
            inputs = tuple(h.get("inputs", BASE_INPUTS))
            if set(inputs) - {PIXEL, IMAGE_VEC, REGIONS} or (REGIONS in inputs and regions is None):
                raise ModelArtifactError(f"attribute model {str(d)!r}: head {name!r} has inputs {list(inputs)} this version cannot build")
            branch = None
            if h.get("branch") is not None:
                from indexing.photo_finetune import load_branch

                if REGIONS not in inputs:
                    raise ModelArtifactError(f"attribute model {str(d)!r}: head {name!r} has a fine-tuned branch but reads no region features")
                branch = load_branch(h["branch"], len(h["classes"]), tensors, f"{name}.branch.", where=repr(str(d)))
            try:
                heads[name] = AttributeHead(name, tuple(h["classes"]), *(tensors[f"{name}.{p}"] for p in ("mean", "scale", "weight", "bias")),
                                            inputs=inputs, branch=branch)
            except KeyError as e:
                raise ModelArtifactError(f"attribute model {str(d)!r}: tensor {e} is missing") from None
        return cls(heads, config["image_model_id"], int(config["pixel_dim"]), tensors["novelty_bank"].astype(np.float32),
                   float(config["novelty_threshold"]), config.get("report", {}), regions)


# ---------------------------------------------------------------------- bad input
#: below this share of foreground pixels nothing was separated from the background
MIN_FOREGROUND_SHARE = 0.02


#: this many separate objects or more: a collage (a pair of shoes or earrings is 2)
COLLAGE_OBJECTS = 3


def photo_quality(pixel: np.ndarray, familiarity: float, novelty_threshold: float, objects: int | None = None) -> str | None:
    """Why a photo's predictions should not be trusted (:data:`NO_PRODUCT`, :data:`UNFAMILIAR`, :data:`COLLAGE`), or None.

    ``objects`` is :func:`indexing.photo_features.object_count` of the photo (None: not checked)."""
    from indexing.photo_features import FG_SHARE_INDEX

    fg_share = float(pixel[FG_SHARE_INDEX])
    if fg_share >= 0.999 or fg_share < MIN_FOREGROUND_SHARE or objects == 0:  # 1.0: the "whole photo" fallback
        return NO_PRODUCT
    if objects is not None and objects >= COLLAGE_OBJECTS:
        return COLLAGE
    if familiarity < novelty_threshold:
        return UNFAMILIAR
    return None


# ---------------------------------------------------------------------- training and evaluation
@dataclass(frozen=True)
class LabelledPhotos:
    """Photos of a catalog with their features and catalog labels (empty string: not known)."""

    ids: list[str]
    pixel: np.ndarray
    image_vec: np.ndarray
    labels: dict[str, list[str]]  # attribute -> per photo
    #: :func:`indexing.photo_regions.region_features` rows (None: not computed; rows of a photo that no region head
    #: has a label for may be zeros) and ``{"recipe", "blocks", "dim"}``
    regions: np.ndarray | None = None
    region_info: dict[str, Any] | None = None
    #: the output of image model block ``maps_block`` (``(n, C, h, w)`` float16) and the product masks (``(n, SIDE, SIDE)``
    #: bool) a fine-tuned branch trains on (None: not computed; rows of a photo no such head has a label for are zeros)
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    maps_block: int | None = None


def split_holdout(ids: Sequence[str], holdout: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out photos, a seeded function of the product ids (stable across runs and catalogs)."""
    import hashlib

    h = np.asarray([int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for i in ids])
    return h < holdout


def _fit_head(name: str, x: np.ndarray, y: Sequence[str], cfg: AttributeConfig) -> AttributeHead:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    with threadpool_limits(2), warnings.catch_warnings():
        # lbfgs stopping at max_iter is the budget (minutes on a CPU), not a failure: held-out accuracy is what counts
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit((x - mean) / scale, list(y))
    classes = tuple(str(c) for c in lr.classes_)
    w, b = lr.coef_, lr.intercept_
    if len(classes) == 2:  # binary: sklearn keeps one row; as a softmax: [-z/2, z/2]
        w = np.stack([-w[0] / 2, w[0] / 2])
        b = np.asarray([-b[0] / 2, b[0] / 2])
    return AttributeHead(name, classes, mean.astype(np.float32), scale.astype(np.float32), w.astype(np.float32), b.astype(np.float32))


def _head_inputs(name: str, data: LabelledPhotos, cfg: AttributeConfig) -> tuple[str, ...]:
    return BASE_INPUTS + ((REGIONS,) if name in cfg.region_heads and data.regions is not None else ())


def _train_branch(name: str, x: np.ndarray, y: np.ndarray, classes: Sequence[str], tr: np.ndarray, data: LabelledPhotos,
                  cfg: AttributeConfig, image_model: Any) -> Any:
    """The head's fine-tuned branch (:func:`indexing.photo_finetune.train_branch`) trained on the training photos
    outside a validation split of them, early-stopped on that split; its mixing weight with the regression is the one
    with the best validation top-1 (then top-3) for a regression fitted without the split (held-out photos unseen)."""
    from indexing.photo_finetune import Branch, FinetuneConfig, branch_proba, fit_temperature, mix, temper, train_branch

    if image_model is None:
        raise ConfigError(f"the {name} head's fine-tuned branch needs the image model (train_attribute_model(..., image_model=)) "
                          "or finetune_heads=()")
    val = split_holdout(data.ids, cfg.finetune_val, cfg.seed + 1000) & tr
    fit = tr & ~val
    if val.sum() < len(classes) or fit.sum() < len(classes):
        raise ConfigError(f"too few labelled photos for the {name} head's fine-tuned branch ({int(fit.sum())} to train, {int(val.sum())} to validate)")
    index = {c: i for i, c in enumerate(classes)}
    yi = np.asarray([index.get(v, -1) for v in y])
    fcfg = FinetuneConfig(from_block=int(data.maps_block), seed=cfg.seed, epochs=cfg.finetune_epochs, patience=cfg.finetune_patience,
                          lr_tail=cfg.finetune_lr)
    module, history = train_branch(image_model, data.maps, data.masks, yi, len(classes), np.flatnonzero(fit), np.flatnonzero(val), fcfg)
    p_branch = branch_proba(module, data.maps[val], data.masks[val])
    p_head = _fit_head(name, x[fit], y[fit], cfg).proba(x[val])
    truth = yi[val]

    # calibration (version 4): each source at the temperature that fits the validation photos best, before mixing
    t_head, t_branch = (fit_temperature(p_head, truth), fit_temperature(p_branch, truth)) if cfg.calibrate else (1.0, 1.0)
    q_head, q_branch = temper(p_head, t_head), temper(p_branch, t_branch)

    def score(w: float) -> tuple[float, float]:
        order = np.argsort(-mix(q_head, q_branch, w), axis=1, kind="stable")
        return float(np.mean(order[:, 0] == truth)), float(np.mean((order[:, :3] == truth[:, None]).any(axis=1)))

    grid = {round(w, 1): score(w) for w in np.arange(0.0, 1.01, 0.1)}
    weight = max(grid, key=lambda w: (grid[w], -w))
    t_mix = fit_temperature(mix(q_head, q_branch, weight), truth) if cfg.calibrate else 1.0
    report = {**history, "val": int(val.sum()), "weight": weight, "val_top1_head": grid[0.0][0], "val_top1_branch": grid[1.0][0],
              "val_top1_mixed": grid[weight][0], "val_top3_mixed": grid[weight][1],
              **({"temperatures": {"head": t_head, "branch": t_branch, "mix": t_mix}} if cfg.calibrate else {})}
    log.info("attribute head %s: fine-tuned branch %s", name, report)
    arch = getattr(image_model, "pretrained_cfg", {}).get("architecture") or type(image_model).__name__
    return Branch(module, arch, fcfg.from_block, weight, dropout=fcfg.dropout, report=report, head_temperature=t_head,
                  branch_temperature=t_branch, mix_temperature=t_mix)


def train_attribute_model(data: LabelledPhotos, image_model_id: str, cfg: AttributeConfig = AttributeConfig(),
                          *, attributes: Iterable[str] = tuple(ATTRIBUTES), image_model: Any = None) -> AttributeModel:
    """Heads trained on the labelled photos outside the hold-out; the report holds each head's held-out accuracy.
    A head of ``cfg.finetune_heads`` also gets a fine-tuned branch when ``data`` carries the block maps (``image_model``:
    the timm module of the image encoder, whose last blocks the branch copies)."""
    held = split_holdout(data.ids, cfg.holdout, cfg.seed)
    base = np.concatenate([data.pixel, data.image_vec], axis=1).astype(np.float32)
    heads: dict[str, AttributeHead] = {}
    report: dict[str, Any] = {}
    for name in attributes:
        if name not in ATTRIBUTES:
            raise ConfigError(f"unknown attribute {name!r}; valid: {', '.join(ATTRIBUTES)}")
        y = np.asarray(data.labels[name], dtype=object)
        known = y != ""
        counts = Counter(y[known & ~held])
        classes = sorted(c for c, n in counts.items() if n >= cfg.min_count)
        tr = known & ~held & np.isin(y, classes)
        if len(classes) < 2:
            log.warning("attribute %s: fewer than 2 values with %d labelled photos; no head", name, cfg.min_count)
            continue
        inputs = _head_inputs(name, data, cfg)
        x = np.concatenate([base, data.regions], axis=1).astype(np.float32) if REGIONS in inputs else base
        t0 = time.perf_counter()
        heads[name] = replace(_fit_head(name, x[tr], y[tr], cfg), inputs=inputs)
        te = known & held
        p = heads[name].proba(x[te])
        extra: dict[str, Any] = {}
        if name in cfg.finetune_heads and REGIONS in inputs and data.maps is not None:
            from indexing.photo_finetune import combine

            branch = _train_branch(name, x, y, heads[name].classes, tr, data, cfg, image_model)
            heads[name] = replace(heads[name], branch=branch)
            p_branch = branch.proba(data.maps[te], data.masks[te])
            extra["branch"] = {"weight": branch.weight,
                               "regression_only": {k: v for k, v in _accuracy(p, heads[name].classes, list(y[te]), list(y[tr])).items()
                                                   if k in ("top1", "top3")},
                               "branch_only": {k: v for k, v in _accuracy(p_branch, heads[name].classes, list(y[te]), list(y[tr])).items()
                                               if k in ("top1", "top3")}}
            p = combine(p, p_branch, branch)
        report[name] = {**_accuracy(p, heads[name].classes, list(y[te]), list(y[tr])), **extra,
                        "classes": len(classes), "train": int(tr.sum()), "seconds": round(time.perf_counter() - t0, 1)}
        log.info("attribute head %s: %s", name, report[name])
    bank_rows = np.flatnonzero(~held)
    rng = np.random.default_rng(cfg.seed)
    if len(bank_rows) > cfg.novelty_sample:
        bank_rows = np.sort(rng.choice(bank_rows, cfg.novelty_sample, replace=False))
    v = data.image_vec / np.maximum(np.linalg.norm(data.image_vec, axis=1, keepdims=True), 1e-12)
    bank = v[bank_rows].astype(np.float32)
    held_best = (v[held] @ bank.T).max(axis=1) if held.any() else np.ones(1)
    threshold = float(np.quantile(held_best, cfg.novelty_quantile)) if cfg.novelty_quantile > 0 else -1.0
    report["novelty"] = {"threshold": round(threshold, 4), "bank": int(len(bank))}
    regions = data.region_info if any(REGIONS in h.inputs for h in heads.values()) else None
    return AttributeModel(heads, image_model_id, int(data.pixel.shape[1]), bank, threshold, report, regions)


def _accuracy(p: np.ndarray, classes: Sequence[str], truth: Sequence[str], train_labels: Sequence[str]) -> dict[str, Any]:
    """Top-1 / top-3 over held-out photos (a value the head cannot name counts as wrong) and the majority baseline
    (always naming the training set's most common value)."""
    n = len(truth)
    if n == 0:
        return {"top1": None, "top3": None, "majority": None, "n": 0}
    order = np.argsort(-p, axis=1, kind="stable")
    cls = np.asarray(classes, dtype=object)
    t = np.asarray(truth, dtype=object)
    top1 = float(np.mean(cls[order[:, 0]] == t))
    top3 = float(np.mean([t[i] in set(cls[order[i, :3]]) for i in range(n)]))
    majority_value = Counter(train_labels).most_common(1)[0][0]
    majority = float(np.mean(t == majority_value))
    conf = p.max(axis=1)
    right = cls[order[:, 0]] == t
    # what completion at a confidence threshold would do: the share of photos it fills and how often it is right
    at = {f"{th:g}": {"coverage": round(float((conf >= th).mean()), 4),
                      "accuracy": round(float(right[conf >= th].mean()), 4) if (conf >= th).any() else None}
          for th in (0.5, 0.7, 0.8, 0.9)}
    return {"top1": round(top1, 4), "top3": round(top3, 4), "majority": round(majority, 4), "n": n, "at_confidence": at}


# ---------------------------------------------------------------------- documents
#: attribute -> (photo value field, confidence field)
PHOTO_FIELDS: dict[str, tuple[str, str]] = {
    "colour": (F.PHOTO_COLOUR, F.PHOTO_COLOUR_CONFIDENCE),
    "article_type": (F.PHOTO_ARTICLE_TYPE, F.PHOTO_ARTICLE_TYPE_CONFIDENCE),
    "gender": (F.PHOTO_GENDER, F.PHOTO_GENDER_CONFIDENCE),
    "usage": (F.PHOTO_USAGE, F.PHOTO_USAGE_CONFIDENCE),
}
#: default confidence from which a missing catalog attribute is completed from the photo (setting attribute_completion_threshold)
DEFAULT_COMPLETION_THRESHOLD = 0.8


def _catalog_value(fields: Mapping[str, Any], attribute: str) -> str | None:
    v = fields.get(ATTRIBUTES[attribute])
    v = str(v).strip() if v is not None else ""
    return v or None


def attribute_document_fields(catalog_fields: Mapping[str, Any], predictions: Mapping[str, Prediction] | None,
                              model_id: str | None, threshold: float = DEFAULT_COMPLETION_THRESHOLD) -> dict[str, Any]:
    """The products-v4 fields of one product: the photo's predictions with their confidence, the catalog attributes
    completed from them (only where the catalog has no value and the confidence reaches ``threshold``) and each
    attribute's ``effective_*`` value (the catalog's, else the completed one). ``predictions`` None: no photo, or no model."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"attribute completion threshold must be in (0, 1], got {threshold!r}")
    out: dict[str, Any] = {}
    completed: list[str] = []
    for attribute, field_name in ATTRIBUTES.items():
        catalog = _catalog_value(catalog_fields, attribute)
        pred = (predictions or {}).get(attribute)
        if pred is not None:
            vf, cf = PHOTO_FIELDS[attribute]
            if pred.value is not None:
                out[vf] = pred.value
            out[cf] = round(float(pred.confidence), 4)
        if catalog is not None:
            out[F.EFFECTIVE_FIELDS[field_name]] = catalog
        elif pred is not None and pred.value is not None and pred.confidence >= threshold:
            completed.append(field_name)
            out[F.EFFECTIVE_FIELDS[field_name]] = pred.value
    out[F.COMPLETED_ATTRIBUTES] = completed
    if model_id is not None and predictions is not None:
        out[F.ATTRIBUTE_MODEL_ID] = model_id
    return out


@dataclass(frozen=True)
class AttributeValue:
    """A product's value of one attribute and where it came from: ``source`` ``"catalog"`` (confidence 1.0),
    ``"photo"`` (a value completed from the photo, with the head's confidence), or None (no value)."""

    value: str | None
    source: str | None
    confidence: float


def attribute_value(doc: Mapping[str, Any], attribute: str) -> AttributeValue:
    """The value of ``attribute`` (``colour``, ``article_type``, ``gender``, ``usage``, or their field names) of an
    indexed document: the catalog's where it has one, else the photo's where indexing completed it, else none."""
    name = attribute
    if name not in ATTRIBUTES:
        by_field = {f: a for a, f in ATTRIBUTES.items()}
        if name not in by_field:
            raise ConfigError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTES)}")
        name = by_field[name]
    catalog = _catalog_value(doc, name)
    if catalog is not None:
        return AttributeValue(catalog, "catalog", 1.0)
    completed = doc.get(F.COMPLETED_ATTRIBUTES) or ()
    vf, cf = PHOTO_FIELDS[name]
    if ATTRIBUTES[name] in completed and doc.get(vf):
        return AttributeValue(str(doc[vf]), "photo", float(doc.get(cf) or 0.0))
    return AttributeValue(None, None, 0.0)


def model_id_of(directory: str | Path) -> str:
    """``photo-attributes:<sha256 of the weights, 12 hex>``: what documents record as ``attribute_model_id`` (reindexing
    predicts again where it changed). A model with a fine-tuned branch (versions 3 and 4) also hashes what its
    predictions read from ``config.json`` beside the weights: each branch's mixing weight and temperatures (two models
    with the same weights but another mix predict differently); a model without one keeps the weights' hash."""
    import hashlib

    d = Path(directory)
    h = hashlib.sha256(d.joinpath(WEIGHTS_FILE).read_bytes())
    try:
        heads = json.loads(d.joinpath(CONFIG_FILE).read_text(encoding="utf-8")).get("heads") or {}
    except (OSError, ValueError, AttributeError):
        heads = {}
    mixes = {n: {k: v for k, v in c["branch"].items() if k != "report"} for n, c in sorted(heads.items())
             if isinstance(c, dict) and isinstance(c.get("branch"), dict)}
    if mixes:
        h.update(json.dumps(mixes, sort_keys=True).encode())
    return f"photo-attributes:{h.hexdigest()[:12]}"


_LOADED: dict[tuple[str, float], tuple[AttributeModel, str]] = {}


def load_cached(directory: str | Path, image_model_id: str) -> tuple[AttributeModel, str]:
    """``(model, model id)`` of the attribute model in ``directory``, loaded once per process (reloaded when its
    weights change); refused when it was trained on another image model's vectors than ``image_model_id``."""
    d = Path(directory)
    try:
        key = (str(d.resolve()), (d / WEIGHTS_FILE).stat().st_mtime)
    except OSError:
        raise ModelArtifactError(f"attribute model {str(d)!r}: {WEIGHTS_FILE} is missing (train one with `fusionrank attributes train`)") from None
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = (AttributeModel.load(d), model_id_of(d))
    model, mid = _LOADED[key]
    if model.image_model_id != image_model_id:
        raise ModelArtifactError(f"attribute model {str(d)!r} was trained on {model.image_model_id} vectors; the index's image "
                                 f"model is {image_model_id}: retrain it")
    return model, mid


def image_vectors(encoder: Any, images: Sequence[Any], model: AttributeModel | None) -> tuple[np.ndarray, Any]:
    """The photos' image vectors (as ``encoder.encode`` gives them) and, for a ``model`` whose heads read region
    features, those features (with the block maps a fine-tuned branch reads) from the same forward pass
    (:func:`indexing.photo_regions.region_inputs`: a :class:`indexing.photo_regions.RegionInputs`); None for a model
    without region heads or no model."""
    if model is not None and model.needs_regions:
        from indexing.photo_regions import region_inputs

        return region_inputs(encoder, images, blocks=model.regions["blocks"], keep_block=model.branch_block)
    return encoder.encode(images), None


def predict_images(model: AttributeModel, images: Sequence[Any], image_vecs: Sequence[np.ndarray], *,
                   regions: Any = None, encoder: Any = None) -> list[dict[str, Prediction]]:
    """Predictions for decoded PIL photos whose image vectors are known (what the indexer holds). A model whose heads
    read region features takes them as ``regions`` (what :func:`image_vectors` gave beside the image vectors), or
    computes them with the image ``encoder`` (one forward pass)."""
    from threadpoolctl import threadpool_limits

    from indexing.photo_features import object_count, pixel_features

    if not images:
        return []
    if model.needs_regions and (regions is None or (model.branch_block is not None and getattr(regions, "maps", None) is None)):
        if encoder is None:
            raise ModelArtifactError("this attribute model's heads read the photo's region features: pass regions= or encoder=")
        _, regions = image_vectors(encoder, images, model)
    with threadpool_limits(1):
        pixel = np.stack([pixel_features(im) for im in images])
        objects = [object_count(im) for im in images]
    return model.predict(pixel, np.stack([np.asarray(v, dtype=np.float32) for v in image_vecs]), regions=regions, objects=objects)
