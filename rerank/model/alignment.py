"""Learned text-image alignment: a projection of image features into the text embedding space.

No CLIP-like model can be loaded offline, so the alignment is learned from the catalog's own
(title, photo) pairs: the title is encoded by the text encoder (MiniLM, 384-d, frozen), the photo by
the image encoder (EfficientNet-Lite0 pooled features, 1280-d, frozen), and a projection
``project: image (1280) -> text space (384)`` is trained with a symmetric InfoNCE loss and a learnable
temperature (CLIP's objective, with the text tower frozen).

The space choice (documented here because retrieval, the index and the ranker all depend on it):

* **The index stores raw image features** (``image_vec``, 1280-d, as the ``products-v1`` mapping
  states). Image-to-image kNN stays in the encoder's own space, and a retrained alignment needs no
  reindex.
* **The aligned space is the text space**: ``aligned = normalize(project(image_vec))``, 384-d. A text
  query vector ``q`` and an aligned image are compared by cosine. The ranker projects candidate and
  history image vectors itself (:meth:`Alignment.project`), exactly.
* **Text query -> kNN on raw ``image_vec``** (:meth:`Alignment.query_to_image_space`, what the
  retriever's ``query_to_image_space`` takes) is approximate: for the linear projection ``W x + b``,
  ``q . (W x + b) = (W^T q) . x + q . b``, so ``W^T q`` (normalized) ranks raw vectors by the aligned
  *dot product*; the aligned cosine also divides by ``|W x + b|``, which varies a little per product.
  The MLP head has no such map: ``query_to_image_space`` refuses it (use :meth:`Alignment.image_scores`).
* An image query can search both fields: ``image_vec`` with its raw vector, ``text_vec`` with
  ``project(image)``.

Features are computed once per encoder model id and cached as ``.npz`` under
``<data_dir>/features/<model id>/`` (:func:`cached_text_features`, :func:`cached_image_features`); image
features can also be read from an index that already holds them (:func:`vectors_from_index`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.errors import CatalogError, ConfigError, DimensionError, ImageError, ModelArtifactError
from rerank.model.torch_lib import require_torch

log = logging.getLogger(__name__)

ALIGNMENT_VERSION = 1


# =========================================================================== pairs and features
@dataclass(frozen=True)
class Pair:
    product_id: str
    title: str
    image_path: Path


def read_pairs(products_csv: str | Path, images_root: str | Path | None = None) -> list[Pair]:
    """(product id, full title, photo path) for every row of a catalog CSV with a title and a photo.

    ``images_root``: the folder the ``image`` column is relative to (default: the CSV's folder).
    Rows without a photo (or whose photo file is missing) are skipped; the count is logged."""
    p = Path(products_csv)
    root = Path(images_root) if images_root is not None else p.parent
    out: list[Pair] = []
    missing = 0
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {F.ID, F.TITLE, F.IMAGE}
            if not need <= set(reader.fieldnames or ()):
                raise CatalogError(f"{p}: needs the columns {sorted(need)}, has {reader.fieldnames}")
            for row in reader:
                img, title = (row.get(F.IMAGE) or "").strip(), (row.get(F.TITLE) or "").strip()
                if not img or not title:
                    continue
                path = root / img
                if not path.is_file():
                    missing += 1
                    continue
                out.append(Pair(str(row[F.ID]).strip(), title, path))
    except OSError as e:
        raise CatalogError(f"cannot read {p}: {e.strerror or e}") from None
    if missing:
        log.warning("%s: %d rows name a photo that is not under %s (skipped)", p, missing, root)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _cache_file(cache_dir: Path, model_id: str, keys: Sequence[str]) -> Path:
    h = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    return Path(cache_dir) / "features" / _safe(model_id) / f"{h}.npz"


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            v = z["vectors"]
        if v.shape[0] == n:
            return v.astype(np.float32, copy=False)
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable feature cache %s (%s)", path, e)
    return None


def _save_cached(path: Path, vectors: np.ndarray, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, vectors=vectors, ids=np.asarray(list(ids)))
    tmp.replace(path)


def cached_text_features(texts: Sequence[str], encoder: Any, *, cache_dir: str | Path | None) -> np.ndarray:
    """``encoder.encode(texts)`` (n, dim), cached under the encoder's ``model_id`` and the texts' hash."""
    texts = list(texts)
    path = _cache_file(Path(cache_dir), encoder.model_id, texts) if cache_dir is not None else None
    if path is not None and (v := _load_cached(path, len(texts))) is not None:
        return v
    v = np.asarray(encoder.encode(texts), dtype=np.float32)
    if path is not None:
        _save_cached(path, v, [str(i) for i in range(len(texts))])
    return v


def cached_image_features(
    pairs: Sequence[Pair],
    encoder: Any,
    *,
    cache_dir: str | Path | None,
    known: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Image features of the pairs' photos: ``(vectors (n, dim), ok mask (n,))``.

    Cached under the image encoder's ``model_id`` (keyed by product ids and photo paths). ``known``
    (``{product_id: vector}``, e.g. :func:`vectors_from_index`) is used first; the rest is encoded. A
    photo that cannot be read is recorded (logged) and its row masked out, the batch goes on."""
    from tqdm import tqdm

    from indexing.images import load_image

    keys = [f"{p.product_id}\t{p.image_path}" for p in pairs]
    dim = int(encoder.dim)
    path = _cache_file(Path(cache_dir), encoder.model_id, keys) if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            if z["vectors"].shape == (len(pairs), dim) and "ok" in z:
                return z["vectors"].astype(np.float32), z["ok"].astype(bool)
    out = np.zeros((len(pairs), dim), dtype=np.float32)
    ok = np.zeros(len(pairs), dtype=bool)
    todo = []
    for i, p in enumerate(pairs):
        v = (known or {}).get(p.product_id)
        if v is not None:
            out[i], ok[i] = np.asarray(v, dtype=np.float32), True
        else:
            todo.append(i)
    if todo:
        log.info("encoding %d photos with %s (%d known already)", len(todo), encoder.model_id, len(pairs) - len(todo))
    bar = tqdm(total=len(todo), desc="image features", unit="img", disable=not progress, file=sys.stderr)
    for s in range(0, len(todo), batch_size):
        rows, imgs = [], []
        for i in todo[s : s + batch_size]:
            try:
                imgs.append(load_image(pairs[i].image_path.name, pairs[i].image_path.parent))
                rows.append(i)
            except ImageError as e:
                log.warning("product %s: photo skipped: %s", pairs[i].product_id, e)
        if imgs:
            out[rows] = encoder.encode(imgs, batch_size=batch_size)
            ok[rows] = True
        bar.update(len(todo[s : s + batch_size]))
    bar.close()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, vectors=out, ok=ok, ids=np.asarray([p.product_id for p in pairs]))
        tmp.replace(path)
    return out, ok


def vectors_from_index(engine: Any, index: str, ids: Sequence[str], field_name: str = F.IMAGE_VEC, *, chunk: int = 1000) -> dict[str, np.ndarray]:
    """``{product_id: vector}`` of ``field_name`` for the ids an index holds (documents without it are left out)."""
    out: dict[str, np.ndarray] = {}
    ids = list(ids)
    for s in range(0, len(ids), chunk):
        docs = engine.get(index, ids[s : s + chunk], fields=[field_name])
        for pid, doc in docs.items():
            v = doc.get(field_name)
            if v is not None:
                out[pid] = np.asarray(v, dtype=np.float32)
    return out


# =========================================================================== the model


@dataclass(frozen=True)
class AlignmentConfig:
    """How the projection is built and trained. ``hidden=0``: linear (the default; it also gives the
    approximate text-query map into the raw image space); ``hidden>0``: a 2-layer MLP plus a linear skip."""

    hidden: int = 0
    dropout: float = 0.1
    epochs: int = 20
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    init_temperature: float = 0.07
    holdout: float = 0.1
    seed: int = 13
    max_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.hidden < 0 or self.epochs < 1 or self.batch_size < 2 or not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"bad alignment config {self}")


def build_head(image_dim: int, text_dim: int, hidden: int = 0, dropout: float = 0.1):
    """The projection module ``(…, image_dim) -> (…, text_dim)`` (not normalized)."""
    torch = require_torch()
    nn = torch.nn

    class AlignmentHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(image_dim, text_dim)
            self.mlp = (
                nn.Sequential(nn.Linear(image_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, text_dim)) if hidden else None
            )
            self.logit_scale = nn.Parameter(torch.tensor(0.0))

        def forward(self, x):
            y = self.linear(x)
            if self.mlp is not None:
                y = y + self.mlp(x)
            return y

    return AlignmentHead()


@dataclass(frozen=True)
class AlignmentReport:
    pairs: int
    train_pairs: int
    heldout_pairs: int
    recall_at_10: float  # text -> image on held-out pairs (the true photo in the top 10 of all held-out photos)
    image_to_text_recall_at_10: float
    chance_recall_at_10: float
    baseline_recall_at_10: float  # same protocol, an untrained random projection
    temperature: float
    epochs: int
    seconds: float
    config: Mapping[str, Any]
    text_model_id: str = ""
    image_model_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Alignment:
    """A trained projection with its metadata. ``project`` / ``image_scores`` / ``query_to_image_space``."""

    def __init__(self, head: Any, *, image_dim: int, text_dim: int, config: AlignmentConfig, text_model_id: str = "", image_model_id: str = "", report: Mapping[str, Any] | None = None):
        self.head = head.eval()
        self.image_dim, self.text_dim = int(image_dim), int(text_dim)
        self.config = config
        self.text_model_id, self.image_model_id = text_model_id, image_model_id
        self.report = dict(report or {})

    # -- use
    def project(self, image_vecs: np.ndarray) -> np.ndarray:
        """Raw image features ``(n, image_dim)`` -> aligned, L2-normalized ``(n, text_dim)``."""
        torch = require_torch()
        x = np.asarray(image_vecs, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.image_dim:
            raise DimensionError(f"image vectors have shape {x.shape}, the alignment takes (n, {self.image_dim})")
        with torch.inference_mode():
            y = torch.nn.functional.normalize(self.head(torch.from_numpy(x)), dim=-1)
        return y.numpy()

    def image_scores(self, query_vec: np.ndarray, image_vecs: np.ndarray) -> np.ndarray:
        """Cosine of a text query vector with the aligned image vectors of candidates (the exact way)."""
        q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.text_dim:
            raise DimensionError(f"query vector has dimension {q.shape[0]}, the alignment's text space is {self.text_dim}")
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        return self.project(image_vecs) @ q

    def query_to_image_space(self, query_vec: np.ndarray) -> np.ndarray:
        """Text query vector -> a raw image-space vector ``normalize(W^T q)`` for kNN on ``image_vec``.

        Approximate (see the module doc); only the linear head has it."""
        if self.head.mlp is not None:
            raise ConfigError("query_to_image_space needs a linear alignment (hidden=0); this one is an MLP: score candidates with image_scores()")
        q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.text_dim:
            raise DimensionError(f"query vector has dimension {q.shape[0]}, the alignment's text space is {self.text_dim}")
        w = self.head.linear.weight.detach().cpu().numpy()  # (text_dim, image_dim)
        v = w.T @ q
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)

    # -- persistence (standalone; the ranker artifact embeds the same tensors)
    def meta(self) -> dict[str, Any]:
        return {
            "version": ALIGNMENT_VERSION,
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "config": asdict(self.config),
            "text_model_id": self.text_model_id,
            "image_model_id": self.image_model_id,
            "space": "aligned = normalize(project(image_vec)), in the text encoder's space",
            "report": self.report,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], state: Mapping[str, Any]) -> "Alignment":
        if meta.get("version") != ALIGNMENT_VERSION:
            raise ModelArtifactError(f"alignment format version {meta.get('version')!r}; this code reads {ALIGNMENT_VERSION}")
        cfg = AlignmentConfig(**meta["config"])
        head = build_head(int(meta["image_dim"]), int(meta["text_dim"]), cfg.hidden, cfg.dropout)
        try:
            head.load_state_dict(dict(state))
        except RuntimeError as e:
            raise ModelArtifactError(f"alignment weights do not fit its config: {e}") from None
        return cls(head, image_dim=meta["image_dim"], text_dim=meta["text_dim"], config=cfg, text_model_id=meta.get("text_model_id", ""), image_model_id=meta.get("image_model_id", ""), report=meta.get("report"))

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(d / "alignment.safetensors"))
        (d / "alignment.json").write_text(json.dumps(self.meta(), indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "Alignment":
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "alignment.json").is_file() or not (d / "alignment.safetensors").is_file():
            raise ModelArtifactError(f"{d} holds no alignment (alignment.json + alignment.safetensors)")
        return cls.from_meta(json.loads((d / "alignment.json").read_text()), load_file(str(d / "alignment.safetensors")))


#: default bound of :class:`AlignedCache` (entries): a 384-d aligned vector with its key takes about 1.9 KB (~95 MB when full)
DEFAULT_ALIGNED_CACHE_SIZE = 50_000


class AlignedCache:
    """``project`` (raw image vectors -> aligned ones) memoized per product, for serving.

    A product's aligned vector does not depend on the query, yet projecting the photos of a request's
    candidates (a (N x 1280) x (1280 x 384) matmul, ~4 ms for 100 candidates on one CPU thread) was, after the
    query encoder, the largest single cost of a rerank call; with this cache only the rows it has not seen
    are projected (one batch). The key is ``(product id, Python's 64-bit hash of the raw vector's bytes)``, so
    a product reindexed with a new photo gets a new key and never the stale vector (the old entry ages out). Bounded: the least recently used entries go first past ``max_entries``.
    Thread-safe: a lock around the lookups and the inserts; the projection runs outside it.

    One cache per projection: the :class:`~rerank.reranker.Reranker` holds one per model (a reloaded model
    comes with a new reranker, hence an empty cache). The values are ``project``'s own output rows, so a
    cached row is the row the projection gave (batch composition can change float rounding only, ~1e-7)."""

    def __init__(self, project: Callable[[np.ndarray], np.ndarray], max_entries: int = DEFAULT_ALIGNED_CACHE_SIZE):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self._project, self.max_entries = project, max_entries
        self._rows: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def __call__(self, ids: Sequence[str], raw: np.ndarray) -> np.ndarray:
        """The aligned rows of ``raw`` (n, image_dim), row ``i`` being product ``ids[i]``'s raw vector."""
        raw = np.ascontiguousarray(raw, dtype=np.float32)
        if len(ids) != len(raw):
            raise DimensionError(f"{len(ids)} ids for {len(raw)} image vectors")
        if not len(raw):
            return np.asarray(self._project(raw), dtype=np.float32)
        keys = [(pid, hash(row.tobytes())) for pid, row in zip(ids, raw)]
        with self._lock:
            rows = [self._rows.get(k) for k in keys]
            for k, row in zip(keys, rows):
                if row is not None:
                    self._rows.move_to_end(k)
            missing = [i for i, row in enumerate(rows) if row is None]
            self._hits += len(keys) - len(missing)
            self._misses += len(missing)
        if missing:
            new = np.asarray(self._project(raw[missing]), dtype=np.float32)
            with self._lock:
                for i, row in zip(missing, new):
                    rows[i] = self._rows[keys[i]] = row.copy()  # a copy: an entry must not keep the whole batch alive
                while len(self._rows) > self.max_entries:
                    self._rows.popitem(last=False)
        return np.stack(rows)

    @property
    def stats(self) -> dict[str, int]:
        """``hits`` / ``misses`` (rows, since creation) and ``entries`` held now."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "entries": len(self._rows), "max_entries": self.max_entries}


# =========================================================================== training
def holdout_mask(ids: Sequence[str], fraction: float, seed: int | str) -> np.ndarray:
    """Seeded split by product id: True = held out (``sha256(seed:id)`` below the fraction; a string seed salts a
    split apart from another one of the same seed)."""
    lim = int(fraction * 2**32)
    return np.array([int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) < lim for i in ids], dtype=bool)


def recall_at_k(queries: np.ndarray, targets: np.ndarray, k: int = 10) -> float:
    """Row i of ``queries`` should find row i of ``targets``: fraction with the true row in the top k (cosine)."""
    n = len(queries)
    if n == 0:
        return 0.0
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    t = targets / np.maximum(np.linalg.norm(targets, axis=1, keepdims=True), 1e-12)
    sims = q @ t.T
    true = sims[np.arange(n), np.arange(n)]
    rank = (sims > true[:, None]).sum(axis=1)  # 0 = first; ties count in favour (none in practice)
    return float((rank < k).mean())


def train_alignment(
    text_vecs: np.ndarray,
    image_vecs: np.ndarray,
    ids: Sequence[str],
    config: AlignmentConfig = AlignmentConfig(),
    *,
    text_model_id: str = "",
    image_model_id: str = "",
    progress: bool = False,
) -> Alignment:
    """Train the projection on (title vector, photo vector) pairs; held-out pairs (by product) are scored.

    Symmetric InfoNCE (text->image and image->text cross-entropy over the in-batch pairs) with a
    learnable temperature; the text side is frozen. Returns the :class:`Alignment` with its report."""
    torch = require_torch()
    from tqdm import tqdm

    t_all = np.asarray(text_vecs, dtype=np.float32)
    i_all = np.asarray(image_vecs, dtype=np.float32)
    if t_all.ndim != 2 or i_all.ndim != 2 or len(t_all) != len(i_all) or len(t_all) != len(ids):
        raise DimensionError(f"text {t_all.shape}, image {i_all.shape} and {len(ids)} ids must pair up row by row")
    if len(ids) < 4:
        raise ConfigError(f"need at least 4 pairs to train an alignment, got {len(ids)}")
    t0 = time.perf_counter()
    held = holdout_mask(ids, config.holdout, config.seed)
    tr = ~held
    if tr.sum() < 2:
        raise ConfigError(f"the held-out fraction {config.holdout} leaves {int(tr.sum())} of {len(ids)} pairs to train on")
    text_dim, image_dim = t_all.shape[1], i_all.shape[1]
    torch.manual_seed(config.seed)
    head = build_head(image_dim, text_dim, config.hidden, config.dropout)
    with torch.no_grad():
        head.logit_scale.fill_(math.log(1.0 / config.init_temperature))

    def _eval(h) -> tuple[float, float]:
        if not held.any():
            return 0.0, 0.0
        h.eval()
        with torch.inference_mode():
            proj = h(torch.from_numpy(i_all[held])).numpy()
        return recall_at_k(t_all[held], proj), recall_at_k(proj, t_all[held])

    baseline, _ = _eval(head)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    xt = torch.from_numpy(t_all[tr])
    xi = torch.from_numpy(i_all[tr])
    n = len(xt)
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    total_steps = config.epochs * steps_per_epoch
    warm = max(1, total_steps // 10)
    # linear warm-up over the first 10% of the steps, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total_steps - warm))))
    )
    gen = torch.Generator().manual_seed(config.seed)
    epochs_run = 0
    bar = tqdm(range(config.epochs), desc="alignment", unit="epoch", disable=not progress, file=sys.stderr)
    for _ in bar:
        head.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, config.batch_size):
            b = perm[s : s + config.batch_size]
            if len(b) < 2:
                continue
            ti = torch.nn.functional.normalize(xt[b], dim=-1)
            im = torch.nn.functional.normalize(head(xi[b]), dim=-1)
            scale = head.logit_scale.clamp(max=math.log(100.0)).exp()
            logits = scale * ti @ im.T
            target = torch.arange(len(b))
            loss = 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        epochs_run += 1
        bar.set_postfix(loss=f"{total / n:.3f}")
        if time.perf_counter() - t0 > config.max_seconds:
            log.warning("alignment training stopped at epoch %d: time budget %.0fs reached", epochs_run, config.max_seconds)
            break
    bar.close()
    r_t2i, r_i2t = _eval(head)
    n_held = int(held.sum())
    report = AlignmentReport(
        pairs=len(ids),
        train_pairs=int(tr.sum()),
        heldout_pairs=n_held,
        recall_at_10=r_t2i,
        image_to_text_recall_at_10=r_i2t,
        chance_recall_at_10=min(1.0, 10.0 / n_held) if n_held else 0.0,
        baseline_recall_at_10=baseline,
        temperature=float(1.0 / head.logit_scale.detach().clamp(max=math.log(100.0)).exp()),
        epochs=epochs_run,
        seconds=round(time.perf_counter() - t0, 2),
        config=asdict(config),
        text_model_id=text_model_id,
        image_model_id=image_model_id,
    )
    log.info("alignment: held-out text->image recall@10 %.3f (chance %.3f, untrained %.3f) on %d pairs", r_t2i, report.chance_recall_at_10, baseline, n_held)
    return Alignment(head, image_dim=image_dim, text_dim=text_dim, config=config, text_model_id=text_model_id, image_model_id=image_model_id, report=report.to_dict())


def align_catalog(
    products_csv: str | Path,
    images_root: str | Path | None,
    *,
    text_encoder: Any,
    image_encoder: Any,
    cache_dir: str | Path | None,
    config: AlignmentConfig = AlignmentConfig(),
    known_image_vectors: Mapping[str, np.ndarray] | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> Alignment:
    """Read (title, photo) pairs, compute or load cached features, train :func:`train_alignment`.

    ``limit``: a seeded sample of that many pairs (tests)."""
    pairs = read_pairs(products_csv, images_root)
    if limit is not None and limit < len(pairs):
        pairs = sorted(pairs, key=lambda p: hashlib.sha256(f"sample:{config.seed}:{p.product_id}".encode()).hexdigest())[:limit]
    if not pairs:
        raise CatalogError(f"{products_csv}: no (title, photo) pairs found (images root {images_root})")
    tv = cached_text_features([p.title for p in pairs], text_encoder, cache_dir=cache_dir)
    iv, ok = cached_image_features(pairs, image_encoder, cache_dir=cache_dir, known=known_image_vectors, progress=progress)
    ids = [p.product_id for i, p in enumerate(pairs) if ok[i]]
    return train_alignment(tv[ok], iv[ok], ids, config, text_model_id=text_encoder.model_id, image_model_id=image_encoder.model_id, progress=progress)


__all__ = [
    "AlignedCache",
    "Alignment",
    "AlignmentConfig",
    "AlignmentReport",
    "DEFAULT_ALIGNED_CACHE_SIZE",
    "Pair",
    "align_catalog",
    "build_head",
    "cached_image_features",
    "cached_text_features",
    "holdout_mask",
    "read_pairs",
    "recall_at_k",
    "train_alignment",
    "vectors_from_index",
]
