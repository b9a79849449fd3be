"""The multimodal fusion ranker (torch): scores the N candidates of a request in one forward pass.

Inputs are :mod:`rerank.model.inputs` batches (``(B, N, ...)`` candidates, ``(B, K, ...)`` history).
Per candidate, five *modalities* are embedded into ``d_model`` dimensions:

* ``text``: the query vector against the candidate's text vector (``q * t``, ``t``, ``cos(q, t)``);
* ``image``: the query against the candidate's *aligned* image vector (the photo projected into the
  text space by :mod:`rerank.model.alignment`): ``q * a``, ``a``, ``cos(q, a)``; masked without a photo;
* ``first_stage``: the retrieval signals (normalized BM25 / kNN scores, reciprocal ranks, missing flags);
* ``product``: hashed categorical fields (type, colour, gender, usage, category, brand) with the query;
* ``history``: DIN-style target attention of the candidate over the user's last K products (text +
  aligned image + event-type embedding + age), masked for a user without history; with
  ``history_agreement``, also :func:`history_agreement`: per categorical field, the share of the history
  products whose value the candidate has (a shopper's taste is a colour, a gender, a usage; from vectors alone
  the DIN layer learns such matches only after many epochs), read by the history embedding and by a linear
  term added to the score for a user with history.

**Query-conditioned gating**: ``softmax`` over the modalities of logits computed from the query vector;
a masked modality gets ``-inf`` (excluded, not zero-filled), so the gates of the present modalities sum
to 1. The **fusion strategy** (``FUSION_STRATEGIES``: ``concat`` | ``weighted`` | ``attention``) combines
the gated modality embeddings; an MLP head gives the score, plus a linear "wide" term on the
first-stage signals and the query-text / query-image cosines (wide & deep: the model starts from what
the first stage knows). Masked inputs are replaced by zeros with
``torch.where`` before any arithmetic, so a masked value (even NaN) cannot change a score.

Ablations (``use_image`` / ``use_history`` / ``use_product``) mask a modality for every request: the
same architecture, retrained without that input.

Inference (eval mode) runs some layers in an algebraically folded form that costs fewer and smaller
operations for the N candidates of a request: what depends on the query alone is computed once per
request (``_query_item_folded``, the product and query-context layers), the DIN layer is one matmul per
request (``_din_logits_folded``) and the modality attention projects no token (``_attend_folded``). The
same function up to float rounding (tested within 1e-5 against the literal form); training runs the
literal form.
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
    #: the history's attribute agreement (:func:`history_agreement`); False for artifacts trained before it
    history_agreement: bool = False

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
    """``forward(emb (B,N,M,d), mask (B,N,M), gates (B,N,M), qctx (B,N,d)) -> (h (B,N,out_dim), gates)``.

    ``reads_gates``: whether ``forward`` uses the query gates it is given (at inference they are not computed
    for a strategy that does not; ``gates`` is then None)."""

    out_dim: int
    reads_gates: bool = True


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

    reads_gates = False  # the attention weights replace the query gates

    def __init__(self, d: int, m: int, cfg: RankerConfig):
        super().__init__()
        self.kind = nn.Parameter(torch.randn(m, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, cfg.heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out_dim = d + d + m + d

    def forward(self, emb, mask, gates, qctx):
        b, n, m, d = emb.shape
        tokens = (emb + self.kind).reshape(b * n, m, d)
        kpm = ~mask.reshape(b * n, m)
        kpm = kpm & ~kpm.all(-1, keepdim=True)  # a padded candidate (nothing present) attends to all: no NaN
        if self.training:
            out, w = self.attn(qctx.reshape(b * n, 1, d), tokens, tokens, key_padding_mask=kpm, need_weights=True, average_attn_weights=True)
        else:
            out, w = self._attend_folded(qctx.reshape(b * n, d), tokens, kpm)
        att_gates = w.reshape(b, n, m)
        gated = (att_gates.unsqueeze(-1) * emb).sum(dim=2)
        h = torch.cat([self.norm(out.reshape(b, n, d)), gated, mask.to(emb.dtype), qctx], dim=-1)
        return h, att_gates

    def _attend_folded(self, q, tokens, kpm):
        """``self.attn(q, tokens, tokens)`` (one query per row, head-averaged weights) for inference, with the key
        and value projections moved to the other side of the dot products.

        Per head, ``(Wq q + bq) . (Wk x + bk) / sqrt(dh) = (Wk^T (Wq q + bq) / sqrt(dh)) . x + c`` where ``c`` does not
        depend on the token, so it cancels in the softmax; and as a head's weights sum to 1, the value projection
        of the weighted token mean equals the weighted mean of the value projections. So no token is projected:
        the (rows * M, d) x (d, 2d) key/value matmul becomes a per-row (d,) x (d, heads) one, and torch's
        general attention code (mask merging, head reshapes) is skipped. The same function up to float rounding
        (tested within 1e-5); training keeps ``nn.MultiheadAttention``."""
        attn = self.attn
        x, m, d = tokens.shape
        h = attn.num_heads
        dh = d // h
        wq, wk, wv = attn.in_proj_weight.split(d)
        bv = attn.in_proj_bias[2 * d :]
        qp = Fn.linear(q, wq, attn.in_proj_bias[:d]) * dh**-0.5  # (X, d): the scaled query projection, heads side by side
        u = torch.bmm(qp.reshape(x, h, dh).transpose(0, 1), wk.reshape(h, dh, d))  # (h, X, d): Wk_h^T q_h
        logits = torch.bmm(tokens, u.permute(1, 2, 0)).masked_fill(kpm.unsqueeze(-1), float("-inf"))  # (X, M, h)
        w = torch.softmax(logits, dim=1)
        z = torch.bmm(w.transpose(1, 2), tokens)  # (X, h, d): each head's weighted token mean
        o = torch.bmm(z.transpose(0, 1), wv.reshape(h, dh, d).transpose(1, 2))  # (h, X, dh)
        out = Fn.linear(o.transpose(0, 1).reshape(x, d) + bv, attn.out_proj.weight, attn.out_proj.bias)
        return out, w.mean(-1)


# --------------------------------------------------------------------------- the ranker
def _masked(x, mask):
    """``x`` where ``mask`` (broadcast over the last dim) else 0 — via where, so NaN/inf cannot leak."""
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _cos(a, b):
    return (Fn.normalize(a, dim=-1) * Fn.normalize(b, dim=-1)).sum(-1, keepdim=True)


def history_agreement(cats, hist_cats, hist_mask):
    """``(B, N, 2C)``: per categorical field, the share of the user's history products (of those with a value in that
    field) whose value the candidate has, then 1 where that share is known (the candidate has a value and some
    history product has one) else 0. ``cats`` (B, N, C) and ``hist_cats`` (B, K, C): hashed buckets, 0 = missing;
    ``hist_mask`` (B, K). A user without history gets zeros."""
    hist_known = (hist_cats > 0) & hist_mask.unsqueeze(-1)  # (B, K, C)
    same = (cats.unsqueeze(2) == hist_cats.unsqueeze(1)) & hist_known.unsqueeze(1)  # (B, N, K, C)
    n_known = hist_known.sum(1, dtype=torch.float32).unsqueeze(1)  # (B, 1, C)
    known = (cats > 0) & (n_known > 0)  # (B, N, C)
    share = torch.where(known, same.sum(2, dtype=torch.float32) / n_known.clamp(min=1.0), torch.zeros((), dtype=torch.float32, device=cats.device))
    return torch.cat([share, known.to(torch.float32)], -1)


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
        agree_dim = 2 * c.n_cat_fields if c.history_agreement else 0
        self.hist_out = _mlp(3 * d + agree_dim, c.hidden, d, c.dropout)
        if c.history_agreement:  # the agreement's own linear score, for a user with history
            self.hist_wide = nn.Linear(agree_dim, 1)
        self.fusion = FUSION_STRATEGIES.create(c.strategy, d, m, c)
        self.head = _mlp(self.fusion.out_dim, c.hidden, 1, c.dropout)
        # the "wide" part: a linear score on the first-stage signals and the two query similarities
        self.wide = nn.Linear(c.first_stage_dim + 4, 1)

    # -- parts
    def _history(self, x: Mapping[str, Any], cand_t, cand_a, cand_tm, cand_am, agree=None):
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
        if self.training:
            hke = hk.unsqueeze(1).expand(b, n, k, -1)
            cke = ck.unsqueeze(2).expand(b, n, k, -1)
            logits = self.din(torch.cat([hke, cke, hke * cke, hke - cke], -1)).squeeze(-1)  # (B,N,K)
        else:
            logits = self._din_logits_folded(hk, ck)
        valid = hmask.unsqueeze(1).expand(b, n, k)
        logits = logits.masked_fill(~valid, float("-inf"))
        has = valid.any(-1, keepdim=True)
        w = torch.softmax(torch.where(has, logits, torch.zeros_like(logits)), dim=-1)
        w = torch.where(valid, w, torch.zeros_like(w))
        # the attention-weighted sum of the history keys: one (N, K) x (K, d) matmul at inference
        pooled = (w.unsqueeze(-1) * hke).sum(2) if self.training else torch.bmm(w, hk)
        emb = self.hist_out(torch.cat([pooled, ck, pooled * ck] + ([agree.to(pooled.dtype)] if agree is not None else []), -1))
        return emb, w, has.squeeze(-1)

    def _din_logits_folded(self, hk, ck):
        """The DIN logits ``din([h, c, h*c, h-c])`` of every (candidate, history item) pair, for inference.

        The first linear layer is split by its four input blocks and, per history item ``h``, folded into one
        linear map of the candidate key: ``W1 h + W2 c + W3 (h*c) + W4 (h-c) + b = (W3 diag(h) + W2 - W4) c +
        ((W1 + W4) h + b)``. The K maps side by side make one (d x K*hidden) matrix, so a single matmul of the N
        candidate keys (bias added by the same call) gives every pair's pre-activation: the ``(B, N, K, 4d)``
        concatenation and the ``(B, N, K, d)`` products and sums are never built. The same function up to float
        rounding (|delta score| ~1e-6; tested within 1e-5); training keeps the literal form."""
        lin1, act, lin2 = self.din[0], self.din[1], self.din[3]  # din[2] is a Dropout(0): the identity
        b, k, d = hk.shape
        n = ck.shape[1]
        w1, w2, w3, w4 = lin1.weight.split(d, dim=1)
        # per_item[b, j, i, :] = w3[:, j] * hk[b, i, j] + (w2 - w4)[:, j]: item i's map, laid out as (B, d, K, hidden)
        per_item = torch.addcmul((w2 - w4).T.unsqueeze(1), w3.T.unsqueeze(1), hk.transpose(1, 2).unsqueeze(-1))
        per_item_bias = Fn.linear(hk, w1 + w4, lin1.bias).reshape(b, 1, -1)  # (B, 1, K*hidden)
        pre = torch.baddbmm(per_item_bias, ck, per_item.reshape(b, d, -1))  # (B, N, K*hidden)
        return Fn.linear(act(pre).reshape(b, n, k, -1), lin2.weight, lin2.bias).squeeze(-1)  # (B, N, K)

    def _query_item_folded(self, mlp, q, v, cos):
        """``mlp(cat([q * v, v, cos]))`` of every candidate row ``v`` (B, N, Dt) with its request's query ``q`` (B, Dt),
        for inference.

        The first linear layer is folded per request: ``W1 (q*v) + W2 v + w3 cos + b = (W1 diag(q) + W2) v + w3 cos
        + b``, one (hidden x Dt) matrix per request, so the ``(B, N, 2Dt+1)`` concatenation and the ``q * v`` product
        are never built and the matmul has Dt inputs instead of 2Dt+1 (half the work of the model's largest
        per-candidate matmuls, text and image). The same function up to float rounding; training keeps the literal form."""
        lin1, act, lin2 = mlp[0], mlp[1], mlp[3]  # mlp[2]: Dropout, the identity at inference
        dt = v.shape[-1]
        w_qv, w_v, w_cos = lin1.weight.split((dt, dt, 1), dim=1)
        per_request = torch.addcmul(w_v, w_qv, q.unsqueeze(1))  # (B, hidden, Dt)
        pre = torch.baddbmm(torch.addcmul(lin1.bias, cos, w_cos.T), v, per_request.transpose(1, 2))  # (B, N, hidden)
        return lin2(act(pre))

    def forward(self, x: Mapping[str, Any]) -> RankerOutput:
        """``x``: :func:`rerank.model.inputs.collate` tensors. Returns scores ``(B, N)`` and the explain parts."""
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
        if self.training:
            e_text = self.text_proj(torch.cat([qn * t, t, _cos(qn, t) * tm.unsqueeze(-1)], -1))
            e_img = self.image_proj(torch.cat([qn * a, a, _cos(qn, a) * am.unsqueeze(-1)], -1))
            cos_t, cos_a = _cos(qn, t) * tm.unsqueeze(-1), _cos(qn, a) * am.unsqueeze(-1)
        else:
            # inference: the query is the same for all N candidates of a request, so what depends on it alone
            # (its normalized vector, the folded first layers, its context vector) is computed once per request
            q_unit = Fn.normalize(q, dim=-1).unsqueeze(-1)  # (B, Dt, 1)
            cos_t = torch.bmm(Fn.normalize(t, dim=-1), q_unit) * tm.unsqueeze(-1)
            e_text = self._query_item_folded(self.text_proj, q, t, cos_t)
            if bool(am.any()):
                cos_a = torch.bmm(Fn.normalize(a, dim=-1), q_unit) * am.unsqueeze(-1)
                e_img = self._query_item_folded(self.image_proj, q, a, cos_a)
            else:
                # shortcut: no candidate has an (aligned) photo, so the image embedding is masked out below
                # (``_masked(emb, mask)``) whatever it holds and every image cosine is 0: the same scores exactly
                cos_a = torch.zeros(b, n, 1, dtype=q.dtype, device=q.device)
                e_img = torch.zeros(b, n, c.d_model, dtype=q.dtype, device=q.device)
        fs = torch.where(x["cand_mask"].unsqueeze(-1), x["first_stage"], torch.zeros((), dtype=q.dtype, device=q.device))
        e_fs = self.fs_proj(fs)
        cats = torch.where(x["cand_mask"].unsqueeze(-1), x["cats"], torch.zeros_like(x["cats"]))
        cat_vec = self.cat_emb(cats).reshape(b, n, -1)
        if self.training:
            qctx = self.q_ctx(qn)
            e_prod = self.product_proj(torch.cat([cat_vec, qctx], -1))
        else:
            q_ctx = self.q_ctx(q)  # (B, d): one context vector per request
            qctx = q_ctx.unsqueeze(1).expand(b, n, -1)
            lin1, act, lin2 = self.product_proj[0], self.product_proj[1], self.product_proj[3]
            w_cat, w_q = lin1.weight.split((cat_vec.shape[-1], q_ctx.shape[-1]), dim=1)
            # the query-context block of the first layer is a per-request bias (one row, not N)
            pre = torch.baddbmm(Fn.linear(q_ctx, w_q, lin1.bias).unsqueeze(1), cat_vec, w_cat.T.expand(b, -1, -1))
            e_prod = lin2(act(pre))
        pm = (cats > 0).any(-1) & x["cand_mask"]
        if not c.use_product:
            pm = torch.zeros_like(pm)
        agree = history_agreement(cats, x["hist_cats"], x["hist_mask"]) if c.history_agreement else None
        e_hist, hw, has_hist = self._history(x, t, a, tm, am, agree)
        hm = has_hist & x["cand_mask"]
        if not c.use_history:
            hm = torch.zeros_like(hm)
            hw = torch.zeros_like(hw)
        fm = x["cand_mask"]
        mask = torch.stack([tm, am, fm, pm, hm], -1)  # (B,N,M) in MODALITIES order
        emb = torch.stack([e_text, e_img, e_fs, e_prod, e_hist], 2)
        emb = _masked(emb, mask)
        gates = None
        if self.training or self.fusion.reads_gates:
            logits = self.gate(q).unsqueeze(1).expand(b, n, -1).masked_fill(~mask, float("-inf"))
            # a padded candidate has no modality: give it uniform logits (its score is -inf anyway)
            logits = torch.where(fm.unsqueeze(-1), logits, torch.zeros_like(logits))
            gates = torch.softmax(logits, -1)
            gates = torch.where(mask, gates, torch.zeros_like(gates))
        h, gates = self.fusion(emb, mask, gates, qctx)
        gates = torch.where(mask, gates, torch.zeros_like(gates))
        wide_in = torch.cat([fs, cos_t, cos_a, tm.unsqueeze(-1).to(q.dtype), am.unsqueeze(-1).to(q.dtype)], -1)
        scores = (self.head(h) + self.wide(wide_in)).squeeze(-1)
        if agree is not None:
            scores = scores + torch.where(hm, self.hist_wide(agree.to(q.dtype)).squeeze(-1), torch.zeros((), dtype=q.dtype, device=q.device))
        scores = scores.masked_fill(~fm, float("-inf"))
        return RankerOutput(scores, gates, hw)

    # -- convenience (inference)
    @property
    def device(self):
        return next(self.parameters()).device

    def score_requests(self, requests: Sequence[Any]) -> list["ScoredRequest"]:
        """Score several requests in one batch (``B x N_max``); inference mode. Returns per request the
        scores in candidate order and the explain parts."""
        from rerank.model.inputs import collate, to_torch

        was = self.training
        if was:  # Module.train() walks every submodule: ~1 ms per call on a served (eval-mode) ranker, so only when needed
            self.eval()
        try:
            with torch.inference_mode():
                out = self(to_torch(collate(requests), self.device))
        finally:
            if was:
                self.train(True)
        return scored_requests(requests, out.scores.float().cpu().numpy(), out.gates.float().cpu().numpy(),
                               out.history_weights.float().cpu().numpy())

    def score(self, request: Any) -> "ScoredRequest":
        return self.score_requests([request])[0]


def scored_requests(requests: Sequence[Any], scores: np.ndarray, gates: np.ndarray, history_weights: np.ndarray) -> list["ScoredRequest"]:
    """Per request of a collated batch, its rows of the ranker's outputs (``(B, N_max)`` scores, ``(B, N_max, M)``
    gates, ``(B, N_max, K)`` history weights as numpy arrays), cut to its own candidates and history items."""
    return [
        ScoredRequest(r.ids, scores[i, : len(r)].copy(), gates[i, : len(r)].copy(),
                      history_weights[i, : len(r), : len(r.hist_ids)].copy(), r.hist_ids)
        for i, r in enumerate(requests)
    ]


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
        instead of one per candidate and the rounding done by numpy on whole arrays (the same dicts, value for
        value; the serving path uses this).

        ``np.round(x, 6)`` equals ``round(x, 6)`` for these values because they are float32: ``x * 1e6`` is exact
        in float64 (a 24-bit mantissa times 15625 * 2**6), so both round the same exact number half to even and
        divide it by 10**6 correctly rounded."""
        n = len(self.ids)
        gates = np.round(self.gates[:n].astype(np.float64), 6).tolist()  # float32 -> float64 is exact: the values float() gives
        mods = MODALITIES
        hist_ids = self.hist_ids
        if not self.history_weights.size:
            return [{"gates": dict(zip(mods, g)), "history_top": []} for g in gates]
        w = self.history_weights[:n]
        order = np.argsort(-w, axis=-1, kind="stable")[:, :top]
        top_w = np.take_along_axis(w, order, axis=-1).astype(np.float64)
        order_l, kept_l, top_l = order.tolist(), (top_w > 0).tolist(), np.round(top_w, 6).tolist()
        return [
            {"gates": dict(zip(mods, g)),
             "history_top": [{"product_id": hist_ids[j], "weight": wj} for j, kept, wj in zip(o, k, t) if kept]}
            for g, o, k, t in zip(gates, order_l, kept_l, top_l)
        ]


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
    "history_agreement",
    "scored_requests",
]
