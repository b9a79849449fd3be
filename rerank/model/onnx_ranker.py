"""The fusion ranker's inference forward on onnxruntime (CPU): the same function, fewer and cheaper operator calls.

Why: on the CPU a rerank call's forward pass is mostly operator dispatch, not arithmetic. The eval-mode
:class:`~rerank.model.ranker.FusionRanker` runs about 700 torch operator calls for one request of 100 candidates
(~25 MFLOP in all); onnxruntime runs the exported graph with its constant folding and operator fusion and a
smaller cost per node. ``fusionrank bench rerank`` reports the two side by side (``model_runtime``).

:class:`OnnxRanker` exports a trained ranker once, at load time, into memory (``torch.onnx.export`` with the
TorchScript tracer, opset 17; nothing is written to disk), into two graphs:

* ``history``: traced on a request whose user has history: the whole forward, used for requests with history;
* ``no_history``: traced without history: the model's own shortcut (no DIN layer), used for the others.

The image branch of the forward is traced with photos present; a request without any photo runs it on the
masked (zero) rows, which gives the same scores as eager torch's shortcut (the image embedding is masked out
either way; tested). Batch, candidate and history axes are dynamic.

After the export the two runtimes score the same probe requests and must agree within :data:`TOLERANCE`;
otherwise (or when the export fails) :func:`cpu_runtime` logs why and the torch ranker is used.
:meth:`OnnxRanker.score_requests` returns the same :class:`~rerank.model.ranker.ScoredRequest` objects as the torch
ranker's. The export and the sessions are the project's (:func:`indexing.encoders.onnx_export_bytes`,
:func:`indexing.encoders.onnx_cpu_session`: the process's thread cap).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from indexing.errors import ConfigError, FusionRankError

log = logging.getLogger(__name__)

#: model runtimes of the rerank call's forward pass
RUNTIMES = ("auto", "torch", "onnx")
#: the largest |score| / gate / history-weight difference between the runtimes accepted at load time
TOLERANCE = 1e-4
OUTPUTS = ("scores", "gates", "history_weights")
#: numpy dtypes of the graph inputs' ONNX types
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


class OnnxExportError(FusionRankError):
    """The ranker could not be exported to ONNX, or the exported graph disagrees with the torch ranker."""


def _probe_batch(cfg: Any, *, n: int, with_history: bool, seed: int) -> dict[str, np.ndarray]:
    """One request of random inputs with the ranker's dimensions (photos on every candidate), collated as serving
    collates a request (:func:`rerank.model.inputs.collate`: the same arrays, names and dtypes)."""
    from rerank.model.inputs import RequestFeatures, collate

    rng = np.random.default_rng(seed)
    dt, k = cfg.text_dim, cfg.history_k

    def vecs(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    hist_mask = np.zeros(k, dtype=bool)
    if with_history:
        hist_mask[: max(1, k // 2)] = True
    cats = rng.integers(0, cfg.hash_buckets, size=(n, cfg.n_cat_fields)).astype(np.int64)
    # the history products' buckets drawn from the candidates' (so that the history agreement sees matches)
    hist_cats = np.where(hist_mask[:, None], cats[rng.integers(0, n, size=k)], 0).astype(np.int64)
    req = RequestFeatures(
        ids=tuple(f"p{i}" for i in range(n)), query=vecs(dt),
        cand_text=vecs(n, dt), cand_text_mask=np.ones(n, dtype=bool), cand_image=vecs(n, dt), cand_image_mask=np.ones(n, dtype=bool),
        first_stage=rng.random((n, cfg.first_stage_dim)).astype(np.float32),
        cats=cats,
        hist_text=vecs(k, dt), hist_text_mask=hist_mask.copy(), hist_image=vecs(k, dt), hist_image_mask=hist_mask.copy(),
        hist_event=np.where(hist_mask, rng.integers(1, 5, size=k), 0).astype(np.int64),
        hist_age=rng.random(k).astype(np.float32), hist_mask=hist_mask,
        hist_ids=tuple(f"h{i}" for i in range(int(hist_mask.sum()))), hist_cats=hist_cats,
    )
    return collate([req])


def _dynamic_axes(names: Sequence[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name in names:
        if name == "query":
            axes[name] = {0: "batch"}
        elif name.startswith("hist"):
            axes[name] = {0: "batch", 1: "history"}
        else:
            axes[name] = {0: "batch", 1: "candidates"}
    axes.update({"scores": {0: "batch", 1: "candidates"}, "gates": {0: "batch", 1: "candidates"},
                 "history_weights": {0: "batch", 1: "candidates", 2: "history"}})
    return axes


class OnnxRanker:
    """``score_requests`` / ``score`` of a :class:`~rerank.model.ranker.FusionRanker` (eval mode, CPU) on onnxruntime."""

    runtime = "onnx"

    def __init__(self, ranker: Any):
        import torch

        if ranker.device.type != "cpu":
            raise ConfigError(f"the ONNX runtime serves CPU models; this one is on {ranker.device}")
        self.config = ranker.config
        self.device = ranker.device
        was = ranker.training
        ranker.eval()  # exported and checked as served: dropout off, the inference forms of the layers
        try:
            self._sessions = {flag: self._export(ranker, torch, with_history=flag) for flag in (True, False)}
            self._check(ranker)
        finally:
            ranker.train(was)

    # -- export
    def _export(self, ranker: Any, torch: Any, *, with_history: bool) -> Any:
        from indexing.encoders import onnx_cpu_session, onnx_export_bytes
        from rerank.model.inputs import to_torch

        batch = _probe_batch(self.config, n=3, with_history=with_history, seed=0)
        names = list(batch)

        class _Outputs(torch.nn.Module):  # tuple outputs for the tracer
            def __init__(self, inner: Any):
                super().__init__()
                self.inner = inner

            def forward(self, *tensors: Any) -> Any:
                out = self.inner(dict(zip(names, tensors)))
                return out.scores, out.gates, out.history_weights

        try:
            data = onnx_export_bytes(_Outputs(ranker), tuple(to_torch(batch).values()), input_names=names, output_names=OUTPUTS,
                                     dynamic_axes=_dynamic_axes(names))
        except Exception as e:  # noqa: BLE001 - any exporter failure means: serve with torch
            raise OnnxExportError(f"ONNX export of the fusion ranker failed: {type(e).__name__}: {e}") from e
        try:
            sess = onnx_cpu_session(data)
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(f"onnxruntime could not load the exported fusion ranker: {type(e).__name__}: {e}") from e
        # inputs the graph does not read (the history arrays of the no-history graph) are dropped by the exporter
        inputs = {i.name: np.dtype(_ORT_TYPES[i.type]) for i in sess.get_inputs()}
        return sess, inputs

    def _check(self, ranker: Any) -> None:
        """Both graphs against the torch ranker on probe requests of other sizes than the export's."""
        import torch

        from rerank.model.inputs import to_torch

        for with_history in (True, False):
            for n, seed in ((17, 1), (1, 2)):
                batch = _probe_batch(self.config, n=n, with_history=with_history, seed=seed)
                with torch.inference_mode():
                    out = ranker(to_torch(batch))
                ref = (out.scores, out.gates, out.history_weights)
                got = self._run(batch)
                for name, a, b in zip(OUTPUTS, got, ref):
                    b = b.float().numpy()
                    if a.shape != b.shape or not np.allclose(a, b, atol=TOLERANCE, rtol=0, equal_nan=False):
                        worst = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("nan")
                        raise OnnxExportError(f"the ONNX graph ({'history' if with_history else 'no_history'}) disagrees with torch on "
                                              f"{name}: shapes {a.shape} / {b.shape}, largest difference {worst:.3g} > {TOLERANCE:g}")

    # -- inference
    def _run(self, batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        sess, inputs = self._sessions[bool(np.asarray(batch["hist_mask"]).any())]
        feed = {name: np.ascontiguousarray(batch[name], dtype=dtype) for name, dtype in inputs.items()}
        return sess.run(list(OUTPUTS), feed)

    def score_requests(self, requests: Sequence[Any]) -> list[Any]:
        """:meth:`rerank.model.ranker.FusionRanker.score_requests` (the same return values, up to float rounding)."""
        from rerank.model.ranker import scored_requests
        from rerank.model.inputs import collate

        return scored_requests(requests, *self._run(collate(requests)))

    def score(self, request: Any) -> Any:
        return self.score_requests([request])[0]


def cpu_runtime(ranker: Any, runtime: str = "auto") -> Any:
    """The object that scores requests for a served ranker: an :class:`OnnxRanker` for ``onnx`` (and for ``auto`` on
    the CPU), else ``ranker`` itself. ``auto`` falls back to torch, logging why, when the export or its check
    fails; ``onnx`` raises :class:`OnnxExportError` then (and :class:`ConfigError` for a model on a GPU)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown model runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if runtime == "torch" or (runtime == "auto" and ranker.device.type != "cpu"):
        return ranker
    try:
        return OnnxRanker(ranker)
    except OnnxExportError as e:
        if runtime == "onnx":
            raise
        log.warning("serving the fusion ranker with torch: %s", e)
        return ranker
    except ImportError as e:
        if runtime == "onnx":
            raise OnnxExportError(f"the ONNX runtime needs the onnx and onnxruntime packages: {e}") from None
        log.warning("serving the fusion ranker with torch (%s)", e)
        return ranker


def runtime_name(scorer: Any) -> str:
    """``onnx`` or ``torch``: what :func:`cpu_runtime` chose."""
    return getattr(scorer, "runtime", "torch")


__all__ = ["OnnxExportError", "OnnxRanker", "RUNTIMES", "TOLERANCE", "cpu_runtime", "runtime_name"]
