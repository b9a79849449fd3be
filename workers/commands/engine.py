"""``fusionrank bench engine``: the LocalEngine benchmark (BM25, kNN, filtered kNN, upserts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer


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
    ) -> None:
        """Build a LocalEngine index of synthetic products in a temp dir and time BM25, kNN and filtered kNN."""
        from indexing.bench_engine import run_engine_bench

        result = run_engine_bench(
            docs=docs, dim=dim, queries=queries, seed=seed, k=k, faiss_threshold=faiss_threshold,
            path=tmp_dir, progress=sys.stderr.isatty(),
        )
        if as_json:
            typer.echo(json.dumps(result))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"LocalEngine: {docs:,} docs, {dim}-d vectors, top-{k}, {queries} queries each")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result.items():
            table.add_row(key, "-" if value is None else f"{value:,}" if isinstance(value, (int, float)) else str(value))
        Console(width=100).print(table)
