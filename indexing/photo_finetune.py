"""The colour head's fine-tuned branch: the image model's last blocks trained on the catalog's labelled photos.

The region features (:mod:`indexing.photo_regions`) pool maps the image model learned for ImageNet. This branch
goes one step further: a **copy of the image model's blocks after** :data:`FROM_BLOCK` (for EfficientNet-Lite0:
blocks 5 and 6 and the 1x1 head convolution with its norm), started from the ImageNet weights and trained with a
small classifier on the catalog's colour labels. It reads the output of block :data:`FROM_BLOCK`, which the forward
pass that makes ``image_vec`` computes anyway (:meth:`indexing.encoders.ImageEncoder.encode_maps`), so at indexing
time only the copied last blocks run again. The last map is averaged over the product's cells (the product mask of
:func:`indexing.photo_regions.product_mask`, as weights per cell), then a linear layer names the colour.

Training (:func:`train_branch`) runs on the CPU in minutes from cached block outputs: cross-entropy with label
smoothing, horizontal flips of the cached maps as augmentation, AdamW, early stopping on a validation split of the
*training* photos; the batch norms keep their ImageNet statistics (only their scale and shift learn). The attribute
model (version 3) stores the branch's weights beside the logistic heads and averages the two heads' probabilities
(:class:`Branch`; the weight chosen on the same validation split). Version 4 also fits softmax temperatures there
(:func:`fit_temperature`): one for each head's probabilities before they are averaged and one for the average
(:func:`combine`), so that its confidence says how often it is right.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from indexing.errors import ConfigError, ModelArtifactError

log = logging.getLogger(__name__)

FINETUNE_RECIPE = "finetune-v1"
#: the block whose output the branch reads (EfficientNet-Lite0: 112 channels at 14 x 14); the blocks after it are copied
FROM_BLOCK = 4


@dataclass(frozen=True)
class FinetuneConfig:
    from_block: int = FROM_BLOCK
    epochs: int = 6
    patience: int = 2  # epochs without a better validation top-1 before stopping
    batch_size: int = 64
    lr_tail: float = 3e-4  # the copied blocks
    lr_head: float = 3e-3  # the classifier
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    dropout: float = 0.2
    flip: bool = True  # horizontal flips of the cached maps (and masks) as augmentation
    balanced: bool = False  # class-balanced loss weights
    seed: int = 13
    threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1 or min(self.lr_tail, self.lr_head) < 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"bad fine-tuning config {self}")


def _torch():
    from indexing.encoders import _import

    return _import("torch", "torch")


def make_branch(image_model: Any, classes: int, *, from_block: int = FROM_BLOCK, dropout: float = 0.2):
    """A :class:`torch.nn.Module`: copies of ``image_model``'s (a timm EfficientNet) blocks after ``from_block``, its
    head convolution and norm, then masked mean pooling and a linear layer of ``classes`` outputs."""
    torch = _torch()
    nn = torch.nn
    blocks = getattr(image_model, "blocks", None)
    if blocks is None or not hasattr(image_model, "conv_head") or not 0 <= from_block < len(blocks) - 1:
        raise ModelArtifactError(f"the image model has no blocks after {from_block} and head convolution to fine-tune")

    class ColourBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tail = nn.Sequential(*[copy.deepcopy(b) for b in list(blocks)[from_block + 1:]],
                                      copy.deepcopy(image_model.conv_head), copy.deepcopy(image_model.bn2))
            self.drop = nn.Dropout(dropout)
            self.fc = nn.Linear(image_model.num_features, classes)

        def pooled(self, x, masks):
            fm = self.tail(x)
            cells = fm.shape[-1]
            k = masks.shape[-1] // cells
            w = torch.nn.functional.avg_pool2d(masks[:, None], k)  # (b, 1, cells, cells) product share per cell
            w = w + 1e-4  # a photo with no product cell pools evenly
            return (fm * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3))

        def forward(self, x, masks):
            return self.fc(self.drop(self.pooled(x, masks)))

        def train(self, mode: bool = True):  # the norms keep their ImageNet statistics
            super().train(mode)
            for mod in self.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.eval()
            return self

    return ColourBranch()


def branch_proba(branch: Any, maps: np.ndarray, masks: np.ndarray, *, flip_tta: bool = False, batch_size: int = 128) -> np.ndarray:
    """``(n, classes)`` softmax of the branch over block outputs ``maps`` (n, C, h, w) and product ``masks`` (n, S, S)
    (``flip_tta``: averaged with the horizontally flipped input)."""
    torch = _torch()
    branch.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(maps), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(maps[s:s + batch_size], dtype=np.float32))
            m = torch.from_numpy(np.ascontiguousarray(masks[s:s + batch_size], dtype=np.float32))
            p = branch(x, m).softmax(-1)
            if flip_tta:
                p = (p + branch(x.flip(-1), m.flip(-1)).softmax(-1)) / 2
            out.append(p.numpy())
    return np.concatenate(out) if out else np.zeros((0, branch.fc.out_features), np.float32)


def train_branch(image_model: Any, maps: np.ndarray, masks: np.ndarray, y: np.ndarray, classes: int,
                 train_rows: np.ndarray, val_rows: np.ndarray, cfg: FinetuneConfig = FinetuneConfig()) -> tuple[Any, dict[str, Any]]:
    """The branch trained on ``train_rows`` of the cached block outputs (``y``: class index per row), early-stopped on
    the top-1 of ``val_rows`` (the best epoch's weights kept); returns it and the history per epoch."""
    import time

    torch = _torch()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    prev = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        branch = make_branch(image_model, classes, from_block=cfg.from_block, dropout=cfg.dropout)
        opt = torch.optim.AdamW([{"params": branch.tail.parameters(), "lr": cfg.lr_tail},
                                 {"params": branch.fc.parameters(), "lr": cfg.lr_head}], weight_decay=cfg.weight_decay)
        weight = None
        if cfg.balanced:
            counts = np.bincount(y[train_rows], minlength=classes).astype(np.float64)
            weight = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / classes, 0.0) ** 0.5, dtype=torch.float32)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
        steps = cfg.epochs * int(np.ceil(len(train_rows) / cfg.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.lr_tail, cfg.lr_head], total_steps=steps, pct_start=0.15)
        best, best_state, history, stale = -1.0, None, [], 0
        yt = torch.from_numpy(y.astype(np.int64))
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            branch.train()
            order = rng.permutation(train_rows)
            total = 0.0
            for s in range(0, len(order), cfg.batch_size):
                rows = np.sort(order[s:s + cfg.batch_size])
                x = torch.from_numpy(maps[rows].astype(np.float32))
                m = torch.from_numpy(masks[rows].astype(np.float32))
                if cfg.flip:
                    f = torch.from_numpy(rng.random(len(rows)) < 0.5)
                    x = torch.where(f[:, None, None, None], x.flip(-1), x)
                    m = torch.where(f[:, None, None], m.flip(-1), m)
                loss = loss_fn(branch(x, m), yt[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(rows)
            p = branch_proba(branch, maps[val_rows], masks[val_rows])
            acc = float(np.mean(p.argmax(1) == y[val_rows])) if len(val_rows) else 0.0
            history.append({"epoch": epoch + 1, "loss": round(total / len(order), 4), "val_top1": round(acc, 4),
                            "seconds": round(time.perf_counter() - t0, 1)})
            log.info("fine-tuning epoch %s", history[-1])
            if acc > best:
                best, best_state, stale = acc, copy.deepcopy(branch.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        branch.load_state_dict(best_state)
        branch.eval()
        return branch, {"config": asdict(cfg), "epochs": history, "val_top1": round(best, 4)}
    finally:
        torch.set_num_threads(prev)


@dataclass(frozen=True)
class Branch:
    """A head's fine-tuned branch: the trained module (:func:`make_branch`), the image model architecture and block it
    continues from, and the share ``weight`` of its probabilities in the head's (:func:`mix`)."""

    module: Any
    arch: str
    from_block: int
    weight: float
    flip_tta: bool = False
    dropout: float = 0.2
    report: dict[str, Any] = field(default_factory=dict)
    #: softmax temperatures (:func:`combine`; version 4, fitted on the validation split): of the regression's
    #: probabilities, of the branch's, and of their average. All 1.0: the version-3 mix.
    head_temperature: float = 1.0
    branch_temperature: float = 1.0
    mix_temperature: float = 1.0

    @property
    def calibrated(self) -> bool:
        return (self.head_temperature, self.branch_temperature, self.mix_temperature) != (1.0, 1.0, 1.0)

    def proba(self, maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return branch_proba(self.module, maps, masks, flip_tta=self.flip_tta)

    def config(self) -> dict[str, Any]:
        temps = ({"temperatures": {"head": self.head_temperature, "branch": self.branch_temperature, "mix": self.mix_temperature}}
                 if self.calibrated else {})
        return {"recipe": FINETUNE_RECIPE, "arch": self.arch, "from_block": self.from_block, "weight": self.weight,
                "flip_tta": self.flip_tta, "dropout": self.dropout, **temps, "report": self.report}

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{k}": np.ascontiguousarray(v.detach().float().cpu().numpy()) for k, v in self.module.state_dict().items()}


def load_branch(config: dict[str, Any], classes: int, tensors: dict[str, np.ndarray], prefix: str, *, where: str) -> Branch:
    """A :class:`Branch` from a saved model's config entry and tensors (``prefix``: the head's key prefix); a recipe
    this version does not compute, or missing / misshapen tensors, are refused naming ``fusionrank attributes train``."""
    torch = _torch()
    from indexing.encoders import _import

    timm = _import("timm", "timm")
    if config.get("recipe") != FINETUNE_RECIPE:
        raise ModelArtifactError(f"attribute model {where}: its fine-tuned branch has recipe {config.get('recipe')!r}; this version "
                                 f"computes {FINETUNE_RECIPE!r}: retrain it with `fusionrank attributes train`")
    try:
        image_model = timm.create_model(config["arch"], pretrained=False)
        module = make_branch(image_model, classes, from_block=int(config["from_block"]), dropout=float(config.get("dropout", 0.2)))
        state = {k[len(prefix):]: torch.from_numpy(np.asarray(v)) for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelArtifactError(f"attribute model {where}: its fine-tuned branch cannot be built ({str(e).splitlines()[0][:300]}): "
                                 "retrain it with `fusionrank attributes train`") from None
    module.eval()
    temps = config.get("temperatures") or {}
    try:
        t = [float(temps.get(k, 1.0)) for k in ("head", "branch", "mix")]
    except (TypeError, ValueError):
        t = [float("nan")]
    if not all(np.isfinite(x) and x > 0 for x in t):
        raise ModelArtifactError(f"attribute model {where}: its fine-tuned branch has temperatures {temps!r} (positive numbers "
                                 "expected): retrain it with `fusionrank attributes train`")
    return Branch(module, str(config["arch"]), int(config["from_block"]), float(config["weight"]), bool(config.get("flip_tta", False)),
                  float(config.get("dropout", 0.2)), dict(config.get("report", {})), *t)


def mix(p_head: np.ndarray, p_branch: np.ndarray, weight: float) -> np.ndarray:
    """The two heads' probabilities averaged: ``(1 - weight) * p_head + weight * p_branch``."""
    return (1.0 - weight) * p_head + weight * p_branch


def temper(p: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``p`` (rows) at a softmax ``temperature``: ``softmax(log p / T)`` (1.0: ``p`` as it is). Above 1
    flattens, below 1 sharpens; the order of the classes never changes."""
    if temperature == 1.0:
        return p
    z = np.log(np.maximum(p, 1e-12)) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


#: the temperatures :func:`fit_temperature` chooses among (log-spaced, 1.0 included)
TEMPERATURES = tuple(float(round(t, 4)) for t in np.exp(np.linspace(np.log(0.25), np.log(4.0), 41)))


def fit_temperature(p: np.ndarray, truth: np.ndarray) -> float:
    """The temperature of :data:`TEMPERATURES` with the lowest mean negative log-likelihood of ``truth`` (class index
    per row) under ``temper(p, T)``: temperature scaling, so that a confidence of 0.8 is right about 80% of the time on
    the photos it was fitted on."""
    rows = np.arange(len(truth))

    def nll(t: float) -> float:
        return float(-np.mean(np.log(np.maximum(temper(p, t)[rows, truth], 1e-12))))

    return min(TEMPERATURES, key=lambda t: (nll(t), abs(np.log(t))))


def combine(p_head: np.ndarray, p_branch: np.ndarray, branch: "Branch") -> np.ndarray:
    """The head's probabilities with its branch's: each source at its temperature, averaged at the branch's weight,
    then the average at the mix temperature (version 4; a version-3 branch has every temperature 1.0: plain :func:`mix`)."""
    p = mix(temper(p_head, branch.head_temperature), temper(p_branch, branch.branch_temperature), branch.weight)
    return temper(p, branch.mix_temperature)


__all__ = ["FINETUNE_RECIPE", "FROM_BLOCK", "TEMPERATURES", "Branch", "FinetuneConfig", "branch_proba", "combine", "fit_temperature",
           "load_branch", "make_branch", "mix", "temper", "train_branch"]
