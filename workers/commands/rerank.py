"""``fusionrank bench rerank``: latency of the drop-in rerank call vs the cross-encoder, one JSON object."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from workers.commands import bench_engine_option as engine_opt


def bench_inputs(settings, limit: int) -> tuple[list[str], list[str | None]]:
    """Queries and users: the simulated shoppers' personal queries of the fashion benchmark when present
    (each with its user, so every call looks a profile up), else the demo's example queries, no user."""
    from rerank.datasets.data import read_queries

    fashion = settings.fashion_dir
    if fashion is not None and (fashion / "bench" / "dev" / "personal_queries.tsv").is_file():
        qs = read_queries(fashion / "bench" / "dev" / "personal_queries.tsv").queries[:limit]
        return [q.text for q in qs], [q.user_id or None for q in qs]
    from workers.commands.demo import EXAMPLE_QUERIES

    return list(EXAMPLE_QUERIES), [None]


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @bench.command("rerank")
    def bench_rerank_cmd(
        requests: int = typer.Option(200, "--requests", min=1, help="Timed rerank calls (after --warmup)."),
        warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed calls first."),
        candidates: int = typer.Option(100, "--candidates", min=1, max=1000, help="First-stage candidates per request."),
        ce_requests: int = typer.Option(20, "--ce-requests", min=0, help="Cross-encoder passes over the same candidates (0: skip)."),
        cross_encoder: Optional[Path] = typer.Option(None, "--cross-encoder", help="A trained cross_encoder directory (default: untrained head; same cost)."),
        threads: int = typer.Option(1, "--threads", min=1, help="CPU threads for both models (torch, numpy BLAS, onnxruntime) and the rest of the process."),
        budget_ms: float = typer.Option(1000.0, "--budget-ms", min=1.0, help="The rerank call's time budget (large: measure, do not fail open)."),
        micro_batch: Optional[bool] = typer.Option(None, "--micro-batch/--no-micro-batch", help="Force the micro-batcher on/off (default: on for CUDA)."),
        as_json: bool = typer.Option(True, "--json/--no-json", help="Print one JSON object (the default)."),
        engine: Optional[str] = engine_opt.option(),
        diversity: Optional[str] = typer.Option(None, "--diversity", help="The calls' diversity: a lambda in [0, 1] or auto "
                                                "(default: FUSIONRANK_DIVERSITY); stages_p50_ms.mmr times the step."),
        compare_diversity: bool = typer.Option(False, "--compare-diversity", help="Also time every request with diversity 0, "
                                               "alternating, and report diversity_compare (p50 with, without, and the difference)."),
    ) -> None:
        """Rerank latency (query encoding, vector fetch, profile lookup, model) p50/p99 vs the cross-encoder p50."""
        from indexing.encoders import limit_threads, resolve_device
        from workers.bench.rerank import bench_rerank
        from rerank.evaluation.trainers import CrossEncoderModel
        from rerank.reranker import Reranker
        from workers.composition import build_reranker
        from workers.settings import load_settings

        from rerank.diversity import parse_diversity

        div = parse_diversity(diversity, what="--diversity") if diversity is not None else None
        engine_name = engine_opt.use(engine)
        settings = load_settings(rerank_budget_ms=budget_ms)
        limit_threads(threads)  # torch, numpy's BLAS, and the onnx-int8 text encoder when it loads (below)
        served = build_reranker(settings)
        reranker = Reranker(served.engine, served.index, served.model, text_encoder=served.text_encoder, image_encoder=served.image_encoder,
                            history=served.history, budget_ms=budget_ms, micro_batch=micro_batch,
                            stands_in_for=served.stands_in_for, diversity=served.diversity,
                            diversity_config=served.diversity_config) if micro_batch is not None else served
        queries, users = bench_inputs(settings, requests + warmup)
        device = resolve_device(settings.device)
        ce = None
        if ce_requests:
            ce = CrossEncoderModel.load(cross_encoder, device) if cross_encoder else CrossEncoderModel.from_base(device)
        res = bench_rerank(reranker, queries, users, candidates=candidates, requests=requests, warmup=warmup, cross_encoder=ce,
                           ce_requests=ce_requests, progress=sys.stderr.isatty(), diversity=div, compare_diversity=compare_diversity)
        res.update({"threads": threads, "device": device, "engine": settings.engine, "cross_encoder_trained": cross_encoder is not None,
                    "note": "users are simulated shoppers (fashion benchmark); each call encodes the query, fetches 100 candidates' vectors and the user's profile"})
        res = {"engine": engine_name, **res}
        if engine_name == "opensearch":
            res["doc_cache"] = dict(getattr(reranker.engine, "doc_cache_stats", {}))
        typer.echo(json.dumps(res) if as_json else json.dumps(res, indent=1))

    @bench.command("batch")
    def bench_batch_cmd(
        save_features: Optional[Path] = typer.Option(None, "--save-features", help="Build the requests' model inputs from the served index, history and encoders and write them here (.npz)."),
        features: Optional[Path] = typer.Option(None, "--features", help="Replay the requests of a file --save-features wrote (no index, store or encoder needed)."),
        model: Optional[Path] = typer.Option(None, "--model", help="The model artifact directory (default: the served model)."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N: where the forward pass runs."),
        requests: int = typer.Option(64, "--requests", min=1, help="Distinct requests to build with --save-features (the benchmark's personal queries)."),
        candidates: int = typer.Option(100, "--candidates", min=1, max=1000, help="First-stage candidates per request."),
        levels: str = typer.Option("1,8,32", "--levels", help="Concurrencies (comma-separated)."),
        per_level: int = typer.Option(2000, "--per-level", min=1, help="Timed requests per level and mode (the distinct ones cycled)."),
        max_batch: int = typer.Option(32, "--max-batch", min=1, help="The micro-batcher's largest batch."),
        max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", min=0.0, help="The micro-batcher's wait for a batch to fill."),
        threads: int = typer.Option(1, "--threads", min=1, help="CPU threads (torch, numpy BLAS, onnxruntime)."),
        engine: Optional[str] = engine_opt.option(),
    ) -> None:
        """The fusion forward pass, direct and micro-batched, at several concurrencies (GPU when present); JSON.

        With neither --save-features nor --features: build the requests here and run at once."""
        from indexing.encoders import limit_threads
        from workers.bench.batch import export_requests, load_requests, parse_levels, run_batch_bench, save_requests
        from workers.settings import load_settings

        lv = parse_levels(levels)
        if features is not None and save_features is not None:
            raise typer.BadParameter("give --save-features (build) or --features (replay), not both")
        limit_threads(threads)
        engine_name = engine_opt.use(engine)
        settings = load_settings(rerank_budget_ms=10_000.0)  # building features is not timed: never fail open
        model_dir = model or settings.effective_model_dir
        if features is None:
            from workers.composition import build_reranker

            served = build_reranker(settings)
            try:
                queries, users = bench_inputs(settings, requests)
                queries = [queries[i % len(queries)] for i in range(requests)]
                reqs = export_requests(served, queries, users, candidates=candidates)
            finally:
                served.close()
            meta = {"engine": engine_name, "model_version": served.model.version if served.model else None, "queries": len(queries),
                    "with_users": sum(users[i % len(users)] is not None for i in range(len(queries))) if users else 0, "candidates": candidates,
                    "note": "simulated shoppers' personal queries (fashion benchmark) when present"}
            if save_features is not None:
                save_requests(save_features, reqs, meta=meta)
                typer.echo(json.dumps({"saved": str(save_features), "requests": len(reqs), "bytes": save_features.stat().st_size, **meta}))
                return
            meta["count"] = len(reqs)  # as a saved file's metadata says
        else:
            reqs, meta = load_requests(features)
        res = run_batch_bench(reqs, model_dir, device=device, levels=lv, per_level=per_level, max_batch=max_batch, max_wait_ms=max_wait_ms,
                              features_meta=meta)
        typer.echo(json.dumps(res))
