"""The colour a photo shows: attribute completion for catalogs whose colour field is often empty.

Catalogs have incomplete attributes: in the fashion benchmark half of the products have no colour in
their text (the colour word is missing from the title and the ``colour`` field is empty), while their
photo still shows it. A text ranker cannot tell the black shoes from the brown ones among those; the
photo can, if something reads the colour off it. The text-image alignment (:mod:`rerank.model.alignment`)
carries colour only weakly (it is trained to match whole titles), so the ranker gets an explicit signal:

* a **colour head**: a softmax classifier from the photo to the catalog's own colour vocabulary, trained on
  the products whose colour field *is* filled (never on a withheld value: the training labels are the
  indexed documents' ``colour`` field). Its inputs (:attr:`ColourModel.inputs`) are the photo's pixel colour
  descriptor ``image_colour`` (:mod:`indexing.photo_colour`) followed by the raw image vector ``image_vec``
  when the index stores the descriptor (mapping products-v3 and later), else ``image_vec`` alone. On the
  fashion benchmark's photographed products with a colour (30 colours, 10% held out) the head on
  ``image_vec`` alone names 53% of held-out photos' colour; with the descriptor in front, 64%;
* the **query's colours**: ``r = softmax(tau * cos(q, name_c))`` over the text vectors of the colour
  names (the same text encoder as the query), so "navy" or "gray" lean on their neighbours among the
  names without a word list; ``max_c cos(q, name_c)`` says how strongly the query names a colour at all.

Per candidate the ranker then gets :data:`COLOUR_FEATURES` (appended to its first-stage inputs when the
feature spec has ``colour``): the query strength, ``photo match = r . p(photo)`` and the head's confidence ``max_c p_c``
(both 0 without a photo: a low match from a confident head says "another colour", from an unsure one
little), ``text match = r[c]`` for a colour field naming vocabulary colour ``c`` (0 otherwise), and whether
the text names one. The model learns how much to trust each; the ``fusion_no_image`` ablation keeps the text
features and loses the photo one, so the comparison isolates what the photo adds.

The head is small (``classes x input dim`` weights) and part of the model artifact (``colour.*`` tensors,
its names, inputs and report in ``config.json``); loading it against an index without a field it reads is
refused (:func:`rerank.model.artifact.check_compatible`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.errors import ConfigError, DimensionError, ModelArtifactError

log = logging.getLogger(__name__)

COLOUR_VERSION = 2  # 2: the head names its input fields (image_colour, image_vec)
#: per-candidate inputs, in this column order
COLOUR_FEATURES: tuple[str, ...] = ("query_colour_strength", "photo_colour_match", "photo_colour_confidence", "text_colour_match", "text_colour_known")


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class ColourConfig:
    min_count: int = 5  # a colour needs this many photographed products with the colour filled in
    epochs: int = 200  # full-batch steps (a softmax regression on a few thousand rows: seconds)
    lr: float = 0.01
    # L2 penalty on the weights (inputs standardized). Measured on the fashion benchmark's 4,745 photographed products
    # with a colour (30 colours, 10% held out): without it the head overfits (train loss 0.005, held-out accuracy 0.46,
    # log-loss 3.8); at 0.03 held-out accuracy 0.53 (majority colour 0.22) and log-loss 1.6: calibrated enough to weigh.
    # With the pixel colour descriptor in front of image_vec, 0.03 also did best of 0.003 / 0.01 / 0.03 (0.64, log-loss 1.22)
    l2: float = 0.03
    holdout: float = 0.1
    temperature: float = 30.0  # of the query's colour distribution over cos(q, name)
    seed: int = 13

    def __post_init__(self) -> None:
        if self.min_count < 1 or self.epochs < 1 or self.l2 < 0 or not 0.0 <= self.holdout < 1.0 or self.temperature <= 0:
            raise ConfigError(f"bad colour config {self}")


class ColourModel:
    """The colour head (``weight`` ``(C, input_dim)``, ``bias`` ``(C,)``) and the colour names' text vectors.

    ``inputs``: the ``(field, dim)`` pairs whose values, concatenated in this order, are a photo's input row."""

    def __init__(self, names: Sequence[str], name_vecs: np.ndarray, weight: np.ndarray, bias: np.ndarray, *,
                 temperature: float, inputs: Sequence[tuple[str, int]] | None = None, report: Mapping[str, Any] | None = None):
        self.names = tuple(str(n) for n in names)
        self.name_vecs = _norm(np.asarray(name_vecs, dtype=np.float32))
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        c = len(self.names)
        if c < 2 or self.name_vecs.shape[0] != c or self.weight.shape[0] != c or self.bias.shape[0] != c:
            raise ModelArtifactError(f"colour head: {c} names, name vectors {self.name_vecs.shape}, weight {self.weight.shape}, bias {self.bias.shape} do not agree")
        self.inputs = tuple((str(f), int(d)) for f, d in inputs) if inputs else ((F.IMAGE_VEC, int(self.weight.shape[1])),)
        if sum(d for _, d in self.inputs) != self.weight.shape[1]:
            raise ModelArtifactError(f"colour head: inputs {list(self.inputs)} add up to {sum(d for _, d in self.inputs)}, the weight takes {self.weight.shape[1]}")
        self.temperature = float(temperature)
        self.report = dict(report or {})
        self._index = {n.strip().lower(): i for i, n in enumerate(self.names)}

    @property
    def input_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def fields(self) -> tuple[str, ...]:
        """The document fields the head reads."""
        return tuple(f for f, _ in self.inputs)

    @property
    def text_dim(self) -> int:
        return int(self.name_vecs.shape[1])

    # -- use
    def photo_probs(self, rows: np.ndarray) -> np.ndarray:
        """Input rows ``(n, input_dim)`` (the :attr:`inputs` concatenated) -> colour probabilities ``(n, C)``."""
        x = np.asarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise DimensionError(f"colour head inputs have shape {x.shape}, the head takes (n, {self.input_dim}) = {' + '.join(f'{f} {d}' for f, d in self.inputs)}")
        return self.photo_probs_of(np.split(x, np.cumsum([d for _, d in self.inputs])[:-1], axis=1))  # column views, no copy

    def photo_probs_of(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """:meth:`photo_probs` of the rows whose :attr:`inputs` come as separate matrices, one per input in order
        (``(n, dim)`` each): the concatenation is never built (a serving call's 100 x 1,496 copy)."""
        if len(parts) != len(self.inputs):
            raise DimensionError(f"colour head: {len(parts)} input matrices for its {len(self.inputs)} inputs {list(self.inputs)}")
        z = self.bias
        at = 0
        for (field, dim), x in zip(self.inputs, parts):
            x = np.asarray(x, dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != dim:
                raise DimensionError(f"colour head input {field} has shape {x.shape}, the head takes (n, {dim})")
            z = z + x @ self.weight[:, at : at + dim].T
            at += dim
        return _softmax(np.atleast_2d(z))

    def query_colours(self, query_vec: np.ndarray) -> tuple[np.ndarray, float]:
        """``(r, strength)``: the query's distribution over the colour names and ``max_c cos(q, name_c)``."""
        q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.text_dim:
            raise DimensionError(f"query vector has dimension {q.shape[0]}, the colour names' text space is {self.text_dim}")
        sims = self.name_vecs @ _norm(q)
        return _softmax(self.temperature * sims), float(sims.max())

    def text_index(self, values: Sequence[Any]) -> np.ndarray:
        """Vocabulary index of each colour field value (case and spaces ignored); -1 = empty or unknown."""
        return np.array([self._index.get(v.strip().lower(), -1) if isinstance(v, str) else -1 for v in values], dtype=np.int64)

    def features(self, query_vec: np.ndarray, photo_probs: np.ndarray, photo_mask: np.ndarray, colour_values: Sequence[Any]) -> np.ndarray:
        """:data:`COLOUR_FEATURES` of ``n`` candidates: ``photo_probs`` ``(n, C)`` (rows where ``photo_mask`` is
        False are ignored), ``colour_values`` the candidates' colour fields."""
        n = len(colour_values)
        r, strength = self.query_colours(query_vec)
        out = np.zeros((n, len(COLOUR_FEATURES)), dtype=np.float32)
        out[:, 0] = strength
        m = np.asarray(photo_mask, dtype=bool)
        if m.any():
            p = np.asarray(photo_probs, dtype=np.float32)[m]
            out[m, 1] = p @ r
            out[m, 2] = p.max(axis=1)
        ti = self.text_index(colour_values)
        known = ti >= 0
        out[known, 3] = r[ti[known]]
        out[:, 4] = known
        return out

    # -- persistence (inside the ranker artifact)
    def meta(self) -> dict[str, Any]:
        return {"version": COLOUR_VERSION, "names": list(self.names), "temperature": self.temperature, "inputs": [list(i) for i in self.inputs],
                "text_dim": self.text_dim, "report": self.report}

    def tensors(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias, "name_vecs": self.name_vecs}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> "ColourModel":
        if meta.get("version") not in (1, COLOUR_VERSION):
            raise ModelArtifactError(f"colour head format version {meta.get('version')!r}; this code reads 1 and {COLOUR_VERSION}")
        missing = {"weight", "bias", "name_vecs"} - set(tensors)
        if missing:
            raise ModelArtifactError(f"colour head tensors {sorted(missing)} are missing")
        arr = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float32) for k, v in tensors.items()}
        inputs = [tuple(i) for i in meta["inputs"]] if meta.get("version", 1) >= 2 else None  # version 1: image_vec alone
        return cls(meta["names"], arr["name_vecs"], arr["weight"], arr["bias"], temperature=float(meta["temperature"]),
                   inputs=inputs, report=meta.get("report"))


def colour_vocabulary(values: Sequence[Any], min_count: int) -> list[str]:
    """Colour names with at least ``min_count`` examples (first spelling seen of each, case-insensitive), by count."""
    spelled: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for v in values:
        if isinstance(v, str) and v.strip():
            k = v.strip().lower()
            spelled.setdefault(k, v.strip())
            counts[k] += 1
    return [spelled[k] for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]


def train_colour_model(rows: np.ndarray, colour_values: Sequence[Any], ids: Sequence[str], *, text_encoder: Any,
                       config: ColourConfig = ColourConfig(), inputs: Sequence[tuple[str, int]] | None = None) -> ColourModel:
    """Train the colour head on products with a photo and a filled colour field (the others are skipped).

    ``rows``: each photo's input row, the ``inputs`` fields concatenated (default: ``image_vec`` alone).
    Softmax regression (full batch, Adam, an L2 penalty) on the standardized inputs; a seeded hold-out by product id
    measures accuracy against the majority colour. Raises :class:`ConfigError` with fewer than two
    colours of ``config.min_count`` examples."""
    from rerank.model.alignment import holdout_mask
    from rerank.model.torch_lib import require_torch as _torch

    torch = _torch()
    x_all = np.asarray(rows, dtype=np.float32)
    if x_all.ndim != 2 or len(x_all) != len(colour_values) or len(x_all) != len(ids):
        raise DimensionError(f"colour head inputs {x_all.shape}, {len(colour_values)} colours and {len(ids)} ids must pair up row by row")
    names = colour_vocabulary(colour_values, config.min_count)
    if len(names) < 2:
        raise ConfigError(f"need at least 2 colours with {config.min_count}+ photographed examples, found {len(names)}")
    index = {n.lower(): i for i, n in enumerate(names)}
    y_all = np.array([index.get(v.strip().lower(), -1) if isinstance(v, str) else -1 for v in colour_values], dtype=np.int64)
    keep = y_all >= 0
    x, y, kid = x_all[keep], y_all[keep], [i for i, k in zip(ids, keep) if k]
    held = holdout_mask(kid, config.holdout, f"colour:{config.seed}")  # by product; salted apart from the alignment's split
    tr = ~held
    t0 = time.perf_counter()
    # standardize with the training rows' statistics, folded into the final weights
    mu, sd = x[tr].mean(axis=0), x[tr].std(axis=0) + 1e-6
    torch.manual_seed(config.seed)
    lin = torch.nn.Linear(x.shape[1], len(names))
    opt = torch.optim.Adam(lin.parameters(), lr=config.lr)
    xt = torch.from_numpy((x[tr] - mu) / sd)
    yt = torch.from_numpy(y[tr])
    for _ in range(config.epochs):
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + config.l2 * (lin.weight**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = lin.weight.detach().numpy() / sd  # (C, D): logits = W ((x - mu) / sd) + b = (W / sd) x + (b - (W / sd) mu)
    b = lin.bias.detach().numpy() - w @ mu
    name_vecs = np.asarray(text_encoder.encode([n.lower() for n in names]), dtype=np.float32)
    model = ColourModel(names, name_vecs, w, b, temperature=config.temperature, inputs=inputs)
    counts = Counter(int(v) for v in y[tr])
    report: dict[str, Any] = {"colours": len(names), "inputs": [f for f, _ in model.inputs], "train_products": int(tr.sum()), "heldout_products": int(held.sum()),
                              "skipped_without_colour": int((~keep).sum()), "seconds": round(time.perf_counter() - t0, 2),
                              "final_train_loss": round(float(loss.item()), 4), "config": config.__dict__.copy()}
    if held.any():
        p = model.photo_probs(x[held])
        top = np.argsort(-p, axis=1)
        report["heldout_accuracy"] = round(float((top[:, 0] == y[held]).mean()), 4)
        report["heldout_top3_accuracy"] = round(float((top[:, :3] == y[held][:, None]).any(axis=1).mean()), 4)
        report["majority_accuracy"] = round(float((y[held] == counts.most_common(1)[0][0]).mean()), 4)
        report["heldout_log_loss"] = round(float(-np.log(np.maximum(p[np.arange(len(p)), y[held]], 1e-12)).mean()), 4)
    model.report.update(report)
    log.info("colour head: %d colours, held-out accuracy %s (majority %s) on %d products", len(names), report.get("heldout_accuracy"),
             report.get("majority_accuracy"), report["heldout_products"])
    return model


__all__ = ["COLOUR_FEATURES", "ColourConfig", "ColourModel", "colour_vocabulary", "train_colour_model"]
