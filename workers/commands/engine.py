"""``fusionrank bench engine``: the engine benchmark (BM25, kNN, filtered kNN, upserts) on the local engine or OpenSearch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from workers.commands import bench_engine_option as engine_opt


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @bench.command("engine")
    def bench_engine(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        docs: int = typer.Option(100_000, "--docs", min=1, help="Synthetic documents to index."),
        dim: int = typer.Option(384, "--dim", min=1, help="Vector dimension (text_vec)."),
        queries: int = typer.Option(200, "--queries", min=1, help="Timed queries per search kind."),
        seed: int = typer.Option(0, "--seed", help="Random seed for documents and queries."),
        k: int = typer.Option(100, "--k", min=1, max=10_000, help="Hits per query (top-k)."),
        faiss_threshold: Optional[int] = typer.Option(
            None, "--faiss-threshold", min=1, help="Use faiss HNSW for fields with at least this many vectors (default: exact)."
        ),
        tmp_dir: Optional[Path] = typer.Option(None, "--tmp-dir", help="Where the temporary index is built (default: the system temp dir)."),
        engine: Optional[str] = engine_opt.option(),
    ) -> None:
        """Build an index of synthetic products (local engine in a temp dir, or OpenSearch) and time BM25, kNN and filtered kNN."""
        from workers.bench.engine import run_engine_bench
        from workers.settings import load_settings

        engine_opt.use(engine)
        settings = load_settings()
        remote = None  # opensearch: the index is built in the cluster (HNSW engine FUSIONRANK_HNSW_ENGINE) and deleted after
        if settings.engine == "opensearch":
            from workers.commands.opensearch import build_opensearch_engine

            remote = build_opensearch_engine(settings)
        try:
            result = run_engine_bench(
                docs=docs, dim=dim, queries=queries, seed=seed, k=k, faiss_threshold=faiss_threshold,
                path=tmp_dir, progress=sys.stderr.isatty(), engine=remote, hnsw_engine=settings.hnsw_engine if remote else None,
            )
        finally:
            if remote is not None:
                remote.close()
        if as_json:
            typer.echo(json.dumps(result))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{result['engine']} engine: {docs:,} docs, {dim}-d vectors, top-{k}, {queries} queries each")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result.items():
            table.add_row(key, "-" if value is None else f"{value:,}" if isinstance(value, (int, float)) else str(value))
        Console(width=100).print(table)
