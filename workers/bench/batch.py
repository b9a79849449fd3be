"""``fusionrank bench batch``: the fusion forward pass on its device, one request at a time and micro-batched.

What it measures: the model stage of a rerank call, the part that moves to a GPU (``Reranker`` puts the ranker on
CUDA when the device is ``cuda``/``auto`` and one is present, and then micro-batches concurrent calls through
:class:`rerank.model.batching.MicroBatcher`). For each concurrency ``c`` it runs ``c`` threads in a closed loop
(:func:`workers.bench.rerank.closed_loop`), each scoring its next request as soon as the previous one is scored:

* ``direct``: each thread calls the ranker itself (``score``: one request per forward pass);
* ``micro_batched``: each thread hands its request to one :class:`MicroBatcher` (``max_batch`` requests per pass,
  waiting at most ``max_wait_ms`` for others to join) and waits for its result.

A request's latency runs from the call to its scores in host memory (``score`` copies them back, which waits for
the GPU). ``rps`` = requests / wall time of the level.

The requests are real ones, prepared where the index lives: ``--save-features FILE`` runs the served reranker's
own feature path (:meth:`rerank.reranker.Reranker.request_features`: first-stage hits of the benchmark's
queries, the candidates' vectors fetched by id, the simulated shoppers' profiles, the query encoded) and writes
the model inputs to one ``.npz``; ``--features FILE --model DIR --device cuda`` replays them on a machine that has
the model artifact and torch but not the index, the history store or the encoders (a GPU box). That is why the
query encoding and feature building are not in these numbers: ``bench rerank`` times the whole call.

Run as ``python -m workers.bench.batch`` too (the same options; it needs only numpy, torch and safetensors).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indexing.errors import ConfigError, FusionRankError
from indexing.machine import machine_info
from workers.bench.rerank import closed_loop, percentile

log = logging.getLogger(__name__)

#: the layout of a features file (bumped when it changes; an older file is refused with this number named)
FEATURES_FORMAT = 1


# --------------------------------------------------------------------------- the features file
def save_requests(path: str | Path, requests: Sequence[Any], *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``requests`` (:class:`rerank.model.inputs.RequestFeatures`) to one compressed ``.npz`` (written to a
    temporary file and renamed into place: never half a file)."""
    from rerank.model.inputs import ARRAY_FIELDS

    if not requests:
        raise ConfigError("no requests to save")
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for i, r in enumerate(requests):
        for name in ARRAY_FIELDS:
            arrays[f"{i}/{name}"] = np.asarray(getattr(r, name))
        arrays[f"{i}/ids"] = np.asarray(list(r.ids), dtype=str)
        arrays[f"{i}/hist_ids"] = np.asarray(list(r.hist_ids), dtype=str)
    arrays["meta"] = np.asarray(json.dumps({**(meta or {}), "format": FEATURES_FORMAT, "count": len(requests)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep it from the other accounts that replay it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_requests(path: str | Path) -> tuple[list[Any], dict[str, Any]]:
    """The requests and the metadata :func:`save_requests` wrote."""
    from rerank.model.inputs import ARRAY_FIELDS, RequestFeatures

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"features file {str(path)!r} does not exist (write one with --save-features)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FEATURES_FORMAT:
                raise ConfigError(f"features file {str(path)!r} has format {meta.get('format')!r}; this version reads {FEATURES_FORMAT}")
            have = set(z.files)
            # a file written before the history's attributes existed has no hist_cats: read as unknown (zeros)
            out = [RequestFeatures(ids=tuple(z[f"{i}/ids"].tolist()), hist_ids=tuple(z[f"{i}/hist_ids"].tolist()),
                                   **{name: z[f"{i}/{name}"] for name in ARRAY_FIELDS if name != "hist_cats" or f"{i}/{name}" in have})
                   for i in range(int(meta["count"]))]
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - not an npz, a missing array, a torn file
        raise ConfigError(f"features file {str(path)!r} could not be read: {type(e).__name__}: {e}") from e
    return out, meta


def export_requests(reranker: Any, queries: Sequence[str], users: Sequence[str | None], *, candidates: int = 100) -> list[Any]:
    """The model inputs of one rerank call per query (user ``users[i % len(users)]``), through the served
    reranker's own feature path; the first-stage hits are the hybrid retrieval's top ``candidates``."""
    from workers.bench.rerank import first_stage_responses

    if not queries:
        raise ConfigError("no queries to build requests from")
    responses = first_stage_responses(reranker, queries, candidates)
    users = list(users) or [None]
    return [reranker.request_features(q, resp, user_id=users[i % len(users)]) for i, (q, resp) in enumerate(zip(queries, responses))]


# --------------------------------------------------------------------------- the benchmark
def _check_inputs(requests: Sequence[Any], config: Any) -> None:
    r = requests[0]
    want = {"query": (config.text_dim,), "first_stage": (None, config.first_stage_dim), "cats": (None, config.n_cat_fields),
            "hist_text": (config.history_k, config.text_dim)}
    for name, shape in want.items():
        got = np.asarray(getattr(r, name)).shape
        if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
            raise ConfigError(f"the features file does not fit this model: {name} has shape {got}, the model takes "
                              f"{tuple('N' if s is None else s for s in shape)} (export the features with the same model)")


def _level(c: int, items: Sequence[Any], score: Any, warm_up: Sequence[Any]) -> dict[str, Any]:
    def send(req: Any) -> float:
        t = time.perf_counter()
        score(req)
        return (time.perf_counter() - t) * 1000.0

    lat, wall = closed_loop(c, send, items, warm_up=warm_up)
    return {"rps": round(len(lat) / wall, 1), "p50_ms": round(percentile(lat, 50), 3), "p99_ms": round(percentile(lat, 99), 3),
            "mean_ms": round(statistics.fmean(lat), 3), "requests": len(lat)}


def run_batch_bench(requests: Sequence[Any], model_dir: str | Path, *, device: str = "auto", levels: Sequence[int] = (1, 8, 32),
                    per_level: int = 2000, max_batch: int = 32, max_wait_ms: float = 2.0,
                    features_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the artifact at ``model_dir`` on ``device`` and time its forward pass on ``requests`` (cycled to
    ``per_level`` per level), direct and micro-batched, at each concurrency of ``levels``. ``features_meta`` (what
    :func:`load_requests` returned, or the metadata of requests built in this process) is reported as ``features``."""
    import torch

    from rerank.model.artifact import load_artifact
    from rerank.model.batching import MicroBatcher

    if not requests:
        raise ConfigError("no requests to score")
    if per_level < 1 or not levels or any(c < 1 for c in levels):
        raise ConfigError(f"per_level and every level must be >= 1, got {per_level} and {list(levels)}")
    art = load_artifact(model_dir, device=device)
    ranker = art.ranker
    _check_inputs(requests, ranker.config)
    dev = ranker.device
    items = [requests[i % len(requests)] for i in range(per_level)]
    for r in requests:  # first touches: kernels, the allocator's pools, cuBLAS handles
        ranker.score(r)
    out: dict[str, Any] = {}
    for c in levels:
        warm = items[: max(2 * c, 4)]
        direct = _level(c, items, ranker.score, warm)
        batcher = MicroBatcher(ranker, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max(256, 4 * c))
        try:
            batched = _level(c, items, batcher.score, warm)
            stats = batcher.stats
        finally:
            batcher.close()
        # the warm-up's requests went through the same batcher: its counts include them
        batched.update({"mean_batch": stats["mean_batch"], "largest_batch": stats["largest_batch"]})
        out[str(c)] = {"direct": direct, "micro_batched": batched}
    sizes = [len(r) for r in requests]
    return {
        "levels": out,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "runtime": f"torch {torch.__version__}",
        "model_version": art.version,
        "distinct_requests": len(requests),
        "requests_per_level": per_level,
        "candidates_median": int(statistics.median(sizes)),
        "requests_with_history": sum(bool(np.asarray(r.hist_mask).any()) for r in requests),
        "max_batch": max_batch, "max_wait_ms": max_wait_ms,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "note": "the fusion forward pass only (features prepared beforehand by the served reranker; see bench rerank for the whole call)",
        "features": {k: v for k, v in (features_meta or {}).items() if k != "format"},
    }


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--levels takes comma-separated integers, got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise ConfigError(f"--levels takes integers >= 1, got {text!r}")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.bench.batch --features F --model DIR [--device cuda]``: the replay side alone."""
    p = argparse.ArgumentParser(prog="python -m workers.bench.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="a file written by fusionrank bench batch --save-features")
    p.add_argument("--model", required=True, help="the model artifact directory the features were built for")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--per-level", type=int, default=2000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    a = p.parse_args(argv)
    try:
        reqs, meta = load_requests(a.features)
        res = run_batch_bench(reqs, a.model, device=a.device, levels=parse_levels(a.levels), per_level=a.per_level,
                              max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, features_meta=meta)
    except FusionRankError as e:  # a bad file or argument, no such device: one line, exit status 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":  # pragma: no cover - the command line
    raise SystemExit(main())
