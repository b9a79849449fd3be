"""The multimodal fusion ranker (torch): scores the N candidates of a request in one forward pass.

Inputs are :mod:`rerank.model_features` batches (``(B, N, ...)`` candidates, ``(B, K, ...)`` history).
Per candidate, five *modalities* are embedded into ``d_model`` dimensions:

* ``text``: the query vector against the candidate's text vector (``q * t``, ``t``, ``cos(q, t)``);
* ``image``: the query against the candidate's *aligned* image vector (the photo projected into the
  text space by :mod:`rerank.alignment`): ``q * a``, ``a``, ``cos(q, a)``; masked without a photo;
* ``first_stage``: the retrieval signals (normalized BM25 / kNN scores, reciprocal ranks, missing flags);
* ``product``: hashed categorical fields (type, colour, gender, usage, category, brand) with the query;
* ``history``: DIN-style target attention of the candidate over the user's last K products (text +
  aligned image + event-type embedding + age), masked for a user without history.

**Query-conditioned gating**: ``softmax`` over the modalities of logits computed from the query vector;
a masked modality gets ``-inf`` (excluded, not zero-filled), so the gates of the present modalities sum
to 1. The **fusion strategy** (``FUSION_STRATEGIES``: ``concat`` | ``weighted`` | ``attention``) combines
the gated modality embeddings; an MLP head gives the score, plus a linear "wide" term on the
first-stage signals and the query-text / query-image cosines (wide & deep: the model starts from what
the first stage knows). Masked inputs are replaced by zeros with
``torch.where`` before any arithmetic, so a masked value (even NaN) cannot change a score.

Ablations (``use_image`` / ``use_history`` / ``use_product``) mask a modality for every request: the
same architecture, retrained without that input.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from indexing.errors import ConfigError, MissingDependencyError
from indexing.registry import Registry

log = logging.getLogger(__name__)

try:  # torch is a dependency of the project; the error names it if an install lacks it
    import torch
    from torch import nn
    from torch.nn import functional as Fn
except ImportError as _e:  # pragma: no cover
    raise MissingDependencyError(f"the fusion ranker needs torch: pip install torch ({_e})") from None


def _torch():
    return torch


MODALITIES: tuple[str, ...] = ("text", "image", "first_stage", "product", "history")
STRATEGIES = ("concat", "weighted", "attention")


@dataclass(frozen=True)
class RankerConfig:
    text_dim: int = 384
    first_stage_dim: int = 13
    n_cat_fields: int = 6
    hash_buckets: int = 4096
    history_k: int = 20
    d_model: int = 64
    cat_dim: int = 16
    hidden: int = 128
    heads: int = 4
    dropout: float = 0.1
    strategy: str = "attention"
    use_image: bool = True
    use_history: bool = True
    use_product: bool = True

    def __post_init__(self) -> None:
        FUSION_STRATEGIES.get(self.strategy)  # UnknownNameError lists the valid ones
        if self.d_model % self.heads:
            raise ConfigError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        for name in ("text_dim", "first_stage_dim", "n_cat_fields", "hash_buckets", "history_k", "d_model", "hidden"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"RankerConfig.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RankerConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class RankerOutput:
    scores: Any  # (B, N); padded candidates get -inf
    gates: Any  # (B, N, M) modality weights (rows sum to 1 over present modalities)
    history_weights: Any  # (B, N, K) attention of each candidate over the history (0 where masked)


# --------------------------------------------------------------------------- fusion strategies
FUSION_STRATEGIES: Registry[Any] = Registry("fusion strategy")


def _mlp(i: int, h: int, o: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Dropout(dropout), nn.Linear(h, o))


class _Fusion(nn.Module):
    """``forward(emb (B,N,M,d), mask (B,N,M), gates (B,N,M), qctx (B,N,d)) -> (h (B,N,out_dim), gates)``."""

    out_dim: int


@FUSION_STRATEGIES.register("concat")
class ConcatFusion(_Fusion):
    """Gated embeddings concatenated (a masked modality's slot is 0) with the mask bits."""

    def __init__(self, d: int, m: int, cfg: RankerConfig):
        super().__init__()
        self.out_dim = m * d + m + d

    def forward(self, emb, mask, gates, qctx):
        b, n, m, d = emb.shape
        g = (gates.unsqueeze(-1) * emb).reshape(b, n, m * d)
        return torch.cat([g, mask.to(emb.dtype), qctx], dim=-1), gates


@FUSION_STRATEGIES.register("weighted")
class WeightedFusion(_Fusion):
    """The gate-weighted sum of the modality embeddings (with the mask bits and the query context)."""

    def __init__(self, d: int, m: int, cfg: RankerConfig):
        super().__init__()
        self.out_dim = d + m + d

    def forward(self, emb, mask, gates, qctx):
        s = (gates.unsqueeze(-1) * emb).sum(dim=2)
        return torch.cat([s, mask.to(emb.dtype), qctx], dim=-1), gates


@FUSION_STRATEGIES.register("attention")
class AttentionFusion(_Fusion):
    """The query context attends over the modality tokens (masked ones excluded); the attention weights
    are the gates; the attended vector plus the gated sum go to the head."""

    def __init__(self, d: int, m: int, cfg: RankerConfig):
        super().__init__()
        self.kind = nn.Parameter(torch.randn(m, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, cfg.heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out_dim = d + d + m + d

    def forward(self, emb, mask, gates, qctx):
        b, n, m, d = emb.shape
        tokens = (emb + self.kind).reshape(b * n, m, d)
        q = qctx.reshape(b * n, 1, d)
        kpm = ~mask.reshape(b * n, m)
        kpm = kpm & ~kpm.all(-1, keepdim=True)  # a padded candidate (nothing present) attends to all: no NaN
        out, w = self.attn(q, tokens, tokens, key_padding_mask=kpm, need_weights=True, average_attn_weights=True)
        att_gates = w.reshape(b, n, m)
        gated = (att_gates.unsqueeze(-1) * emb).sum(dim=2)
        h = torch.cat([self.norm(out.reshape(b, n, d)), gated, mask.to(emb.dtype), qctx], dim=-1)
        return h, att_gates


# --------------------------------------------------------------------------- the ranker
def _masked(x, mask):
    """``x`` where ``mask`` (broadcast over the last dim) else 0 — via where, so NaN/inf cannot leak."""
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _cos(a, b):
    return (Fn.normalize(a, dim=-1) * Fn.normalize(b, dim=-1)).sum(-1, keepdim=True)


class FusionRanker(nn.Module):
    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = c = config
        d, dt = c.d_model, c.text_dim
        self.modalities = MODALITIES
        m = len(MODALITIES)
        self.q_ctx = nn.Sequential(nn.Linear(dt, d), nn.GELU())
        self.gate = nn.Linear(dt, m)
        self.text_proj = _mlp(2 * dt + 1, c.hidden, d, c.dropout)
        self.image_proj = _mlp(2 * dt + 1, c.hidden, d, c.dropout)
        self.fs_proj = _mlp(c.first_stage_dim, c.hidden, d, c.dropout)
        self.cat_emb = nn.Embedding(c.hash_buckets, c.cat_dim, padding_idx=0)
        self.product_proj = _mlp(c.n_cat_fields * c.cat_dim + d, c.hidden, d, c.dropout)
        # DIN target attention
        self.cand_key = nn.Linear(2 * dt + 2, d)
        self.event_emb = nn.Embedding(5, 8, padding_idx=0)
        self.hist_key = nn.Linear(2 * dt + 2 + 8 + 1, d)
        self.din = _mlp(4 * d, c.hidden // 2, 1, 0.0)
        self.hist_out = _mlp(3 * d, c.hidden, d, c.dropout)
        self.fusion = FUSION_STRATEGIES.create(c.strategy, d, m, c)
        self.head = _mlp(self.fusion.out_dim, c.hidden, 1, c.dropout)
        # the "wide" part: a linear score on the first-stage signals and the two query similarities
        self.wide = nn.Linear(c.first_stage_dim + 4, 1)

    # -- parts
    def _history(self, x: Mapping[str, Any], cand_t, cand_a, cand_tm, cand_am):
        b, n, _ = cand_t.shape
        hmask = x["hist_mask"]
        if not self.training and not bool(hmask.any()):
            # inference shortcut: no request in the batch has history, so every weight is 0, ``has`` is False and
            # the embedding is masked out by the caller: the same outputs as the full computation, without it
            k = hmask.shape[1]
            return (torch.zeros(b, n, self.config.d_model, dtype=cand_t.dtype, device=cand_t.device),
                    torch.zeros(b, n, k, dtype=cand_t.dtype, device=cand_t.device),
                    torch.zeros(b, n, dtype=torch.bool, device=cand_t.device))
        ht_m, hi_m = x["hist_text_mask"], x["hist_image_mask"]
        ht = _masked(x["hist_text"], ht_m)
        hi = _masked(x["hist_image"], hi_m)
        ev = torch.where(hmask, x["hist_event"], torch.zeros_like(x["hist_event"]))
        age = torch.where(hmask, x["hist_age"], torch.zeros_like(x["hist_age"])).unsqueeze(-1)
        hk = self.hist_key(torch.cat([ht, hi, ht_m.unsqueeze(-1).to(ht.dtype), hi_m.unsqueeze(-1).to(ht.dtype), self.event_emb(ev), age], -1))  # (B,K,d)
        ck = self.cand_key(torch.cat([cand_t, cand_a, cand_tm.unsqueeze(-1).to(cand_t.dtype), cand_am.unsqueeze(-1).to(cand_t.dtype)], -1))  # (B,N,d)
        k = hk.shape[1]
        hke = hk.unsqueeze(1).expand(b, n, k, -1)
        cke = ck.unsqueeze(2).expand(b, n, k, -1)
        if self.training:
            logits = self.din(torch.cat([hke, cke, hke * cke, hke - cke], -1)).squeeze(-1)  # (B,N,K)
        else:
            logits = self._din_logits_split(hk, ck)
        valid = hmask.unsqueeze(1).expand(b, n, k)
        logits = logits.masked_fill(~valid, float("-inf"))
        has = valid.any(-1, keepdim=True)
        w = torch.softmax(torch.where(has, logits, torch.zeros_like(logits)), dim=-1)
        w = torch.where(valid, w, torch.zeros_like(w))
        pooled = (w.unsqueeze(-1) * hke).sum(2)
        emb = self.hist_out(torch.cat([pooled, ck, pooled * ck], -1))
        return emb, w, has.squeeze(-1)

    def _din_logits_split(self, hk, ck):
        """The DIN logits ``din([h, c, h*c, h-c])`` of every (candidate, history item) pair, for inference.

        The first linear layer is split by its four input blocks, ``W1 h + W2 c + W3 (h*c) + W4 (h-c) + b =
        (W1+W4) h + (W2-W4) c + W3 (h*c) + b``, so only the ``h*c`` block runs over all N*K pairs (d inputs
        instead of 4d) and the ``(B, N, K, 4d)`` concatenation is never built: about a quarter of the work of
        the largest matmul of the model. The same function up to float rounding (|delta score| ~1e-6; tested
        within 1e-5); training keeps the literal form."""
        lin1, act, drop, lin2 = self.din[0], self.din[1], self.din[2], self.din[3]
        d = hk.shape[-1]
        w1, w2, w3, w4 = lin1.weight.split(d, dim=1)
        per_hist = Fn.linear(hk, w1 + w4)  # (B,K,h)
        per_cand = Fn.linear(ck, w2 - w4, lin1.bias)  # (B,N,h)
        pre = Fn.linear(hk.unsqueeze(1) * ck.unsqueeze(2), w3)  # (B,N,K,h)
        pre = pre + per_hist.unsqueeze(1) + per_cand.unsqueeze(2)
        return lin2(drop(act(pre))).squeeze(-1)

    def forward(self, x: Mapping[str, Any]) -> RankerOutput:
        """``x``: :func:`rerank.model_features.collate` tensors. Returns scores ``(B, N)`` and the explain parts."""
        c = self.config
        q = x["query"]  # (B, Dt)
        b, n = x["cand_mask"].shape
        qn = q.unsqueeze(1).expand(b, n, -1)
        tm = x["cand_text_mask"] & x["cand_mask"]
        am = x["cand_image_mask"] & x["cand_mask"]
        if not c.use_image:
            am = torch.zeros_like(am)
        t = _masked(x["cand_text"], tm)
        a = _masked(x["cand_image"], am)
        e_text = self.text_proj(torch.cat([qn * t, t, _cos(qn, t) * tm.unsqueeze(-1)], -1))
        if not self.training and not bool(am.any()):
            # inference shortcut: no candidate has an (aligned) photo, so the image embedding is masked out
            # below (``_masked(emb, mask)``) whatever it holds; skipping its MLP gives the same scores exactly.
            # (Not in training: the MLP's dropout would draw different random numbers.)
            e_img = torch.zeros(b, n, c.d_model, dtype=q.dtype, device=q.device)
        else:
            e_img = self.image_proj(torch.cat([qn * a, a, _cos(qn, a) * am.unsqueeze(-1)], -1))
        fs = torch.where(x["cand_mask"].unsqueeze(-1), x["first_stage"], torch.zeros((), dtype=q.dtype, device=q.device))
        e_fs = self.fs_proj(fs)
        qctx = self.q_ctx(qn)
        cats = torch.where(x["cand_mask"].unsqueeze(-1), x["cats"], torch.zeros_like(x["cats"]))
        cat_vec = self.cat_emb(cats).reshape(b, n, -1)
        e_prod = self.product_proj(torch.cat([cat_vec, qctx], -1))
        pm = (cats > 0).any(-1) & x["cand_mask"]
        if not c.use_product:
            pm = torch.zeros_like(pm)
        e_hist, hw, has_hist = self._history(x, t, a, tm, am)
        hm = has_hist & x["cand_mask"]
        if not c.use_history:
            hm = torch.zeros_like(hm)
            hw = torch.zeros_like(hw)
        fm = x["cand_mask"]
        mask = torch.stack([tm, am, fm, pm, hm], -1)  # (B,N,M) in MODALITIES order
        emb = torch.stack([e_text, e_img, e_fs, e_prod, e_hist], 2)
        emb = _masked(emb, mask)
        logits = self.gate(q).unsqueeze(1).expand(b, n, -1).masked_fill(~mask, float("-inf"))
        # a padded candidate has no modality: give it uniform logits (its score is -inf anyway)
        logits = torch.where(fm.unsqueeze(-1), logits, torch.zeros_like(logits))
        gates = torch.softmax(logits, -1)
        gates = torch.where(mask, gates, torch.zeros_like(gates))
        h, gates = self.fusion(emb, mask, gates, qctx)
        gates = torch.where(mask, gates, torch.zeros_like(gates))
        cos_t, cos_a = _cos(qn, t) * tm.unsqueeze(-1), _cos(qn, a) * am.unsqueeze(-1)
        wide_in = torch.cat([fs, cos_t, cos_a, tm.unsqueeze(-1).to(q.dtype), am.unsqueeze(-1).to(q.dtype)], -1)
        scores = (self.head(h) + self.wide(wide_in)).squeeze(-1).masked_fill(~fm, float("-inf"))
        return RankerOutput(scores, gates, hw)

    # -- convenience (inference)
    @property
    def device(self):
        return next(self.parameters()).device

    def score_requests(self, requests: Sequence[Any]) -> list["ScoredRequest"]:
        """Score several requests in one batch (``B x N_max``); inference mode. Returns per request the
        scores in candidate order and the explain parts."""
        from rerank.model_features import collate, to_torch

        was = self.training
        if was:  # Module.train() walks every submodule: ~1 ms per call on a served (eval-mode) ranker, so only when needed
            self.eval()
        try:
            with torch.inference_mode():
                out = self(to_torch(collate(requests), self.device))
        finally:
            if was:
                self.train(True)
        scores = out.scores.float().cpu().numpy()
        gates = out.gates.float().cpu().numpy()
        hw = out.history_weights.float().cpu().numpy()
        return [
            ScoredRequest(r.ids, scores[i, : len(r)].copy(), gates[i, : len(r)].copy(), hw[i, : len(r), : len(r.hist_ids)].copy(), r.hist_ids)
            for i, r in enumerate(requests)
        ]

    def score(self, request: Any) -> "ScoredRequest":
        return self.score_requests([request])[0]


@dataclass(frozen=True, eq=False)
class ScoredRequest:
    ids: tuple[str, ...]
    scores: np.ndarray  # (N,)
    gates: np.ndarray  # (N, M)
    history_weights: np.ndarray  # (N, len(hist_ids))
    hist_ids: tuple[str, ...]

    def explain(self, i: int, *, top: int = 3) -> dict[str, Any]:
        """Gate per modality and the top history items (by attention weight) of candidate ``i``."""
        w = self.history_weights[i] if self.history_weights.size else np.zeros(0)
        order = [int(j) for j in np.argsort(-w, kind="stable")[:top] if w[j] > 0]
        return {
            "gates": {m: round(float(g), 6) for m, g in zip(MODALITIES, self.gates[i])},
            "history_top": [{"product_id": self.hist_ids[j], "weight": round(float(w[j]), 6)} for j in order],
        }

    def explain_all(self, *, top: int = 3) -> list[dict[str, Any]]:
        """``[self.explain(i, top=top) for i in range(len(self.ids))]`` with one argsort over all candidates
        instead of one per candidate (the same dicts, value for value; the serving path uses this)."""
        n = len(self.ids)
        gates = self.gates.astype(np.float64).tolist()  # float32 -> float64 is exact: the same values float() gives
        mods = MODALITIES
        if self.history_weights.size:
            w = self.history_weights[:n]
            order = np.argsort(-w, axis=-1, kind="stable")[:, :top]
            top_w = np.take_along_axis(w, order, axis=-1).astype(np.float64)
            order_l, top_l = order.tolist(), top_w.tolist()
        else:
            order_l, top_l = [[] for _ in range(n)], [[] for _ in range(n)]
        hist_ids = self.hist_ids
        out = []
        for i in range(n):
            out.append({
                "gates": {m: round(g, 6) for m, g in zip(mods, gates[i])},
                "history_top": [{"product_id": hist_ids[j], "weight": round(wj, 6)} for j, wj in zip(order_l[i], top_l[i]) if wj > 0],
            })
        return out


def build_ranker(config: RankerConfig, *, device: str = "auto", seed: int | None = None) -> FusionRanker:
    from indexing.encoders import resolve_device

    if seed is not None:
        torch.manual_seed(seed)
    return FusionRanker(config).to(resolve_device(device))


__all__ = [
    "FUSION_STRATEGIES",
    "FusionRanker",
    "MODALITIES",
    "RankerConfig",
    "RankerOutput",
    "STRATEGIES",
    "ScoredRequest",
    "build_ranker",
]
