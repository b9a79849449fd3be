"""``fusionrank index`` (the bulk indexing job) and ``fusionrank worker`` (a Celery worker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from workers.commands import bench_engine_option as engine_opt


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("index")
    def index_cmd(
        catalog: Path = typer.Option(..., "--catalog", help="Catalog file: .csv, .jsonl or .parquet."),
        images_root: Optional[Path] = typer.Option(None, "--images-root", help="Folder image paths are relative to (default: the catalog's folder)."),
        engine: Optional[str] = typer.Option(None, "--engine", help="local | opensearch (default: FUSIONRANK_ENGINE or local)."),
        alias: Optional[str] = typer.Option(None, "--alias", help="Index alias to write to (default: FUSIONRANK_INDEX_ALIAS or products)."),
        via: str = typer.Option("inline", "--via", help="inline: in this process; celery: dispatch batches to running workers."),
        batch_size: int = typer.Option(256, "--batch-size", min=1, max=10_000, help="Catalog rows per batch (one Celery task each)."),
        preset: Optional[str] = typer.Option(None, "--preset", help="Catalog field map: fashion | homedepot (default: detect from the header)."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Index only the first N rows."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="--via celery: give up waiting after this many seconds."),
    ) -> None:
        """Index a product catalog: text and image embeddings into the engine's knn_vector fields."""
        from indexing.pipeline import IndexJob
        from workers.composition import build_engine
        from workers.jobs import run_index_job
        from workers.settings import load_settings

        settings = load_settings(engine=engine, index_alias=alias)
        job = IndexJob(
            catalog=str(catalog.resolve()),
            index=settings.index_alias,
            images_root=str((images_root or catalog.parent).resolve()),
            preset=preset,
            text_model=settings.text_model,
            text_backend=settings.text_backend,
            image_model=settings.image_model,
            device=settings.device,
            batch_size=batch_size,
        )
        eng = build_engine(settings)
        try:
            summary = run_index_job(eng, settings, job, via=via, limit=limit, timeout_s=timeout)
        finally:
            eng.close()
        if as_json:
            typer.echo(json.dumps(summary.to_dict()))
            return
        d = summary.to_dict(max_errors=10)
        typer.echo(
            f"indexed {d['indexed']}, unchanged {d['unchanged']}, failed {d['failed']} of {d['rows']} rows "
            f"into {d['index']} via {d['via']} in {d['seconds']:.1f} s ({d['docs_per_s']:.0f} docs/s)"
        )
        for kind, n in d["failure_reasons"].items():
            typer.echo(f"  {n:6d} x {kind}")
        for e in d["errors"]:
            typer.echo(f"  row {e['row']} id {e['id']}: {e['reason']}")
        if d["errors_truncated"]:
            typer.echo(f"  ... and {d['errors_truncated']} more (use --json for the first 100)")

    @bench.command("index")
    def bench_index_cmd(
        limit: int = typer.Option(2000, "--limit", min=1, help="Products (with photos) to index."),
        catalog: Optional[Path] = typer.Option(None, "--catalog", help="Default: <shared data>/fashion/bench/catalog.csv."),
        images_root: Optional[Path] = typer.Option(None, "--images-root", help="Default: <shared data>/fashion."),
        batch_size: int = typer.Option(256, "--batch-size", min=1),
        via: str = typer.Option("inline", "--via", help="inline | celery (needs a running `fusionrank worker`)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        engine: Optional[str] = engine_opt.option(),
    ) -> None:
        """Indexing throughput: text/image encoders alone vs the whole pipeline on the same products."""
        from workers.bench.index import run_index_bench
        from workers.settings import load_settings

        engine_name = engine_opt.use(engine)
        settings = load_settings()
        cat, root = settings.fashion_bench(catalog, images_root)
        out = {"engine": engine_name, **run_index_bench(settings, catalog=cat, images_root=root, limit=limit, batch_size=batch_size, via=via)}
        if as_json:
            typer.echo(json.dumps(out))
        else:
            for k, v in out.items():
                typer.echo(f"{k:>24}  {v}")

    @app.command("worker")
    def worker_cmd(
        queues: str = typer.Option("embed,index,admin", "--queues", "-Q", help="Comma-separated queues to consume."),
        concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Worker processes (each loads the models once)."),
        loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
        hostname: Optional[str] = typer.Option(None, "--hostname", "-n", help="Node name, e.g. embed@%h."),
    ) -> None:
        """Start a Celery worker (broker from FUSIONRANK_BROKER_URL; Redis by default, RabbitMQ by amqp:// URL)."""
        from workers.celery_app import QUEUES, app as celery_app

        qs = [q.strip() for q in queues.split(",") if q.strip()]
        unknown = sorted(set(qs) - set(QUEUES))
        if unknown:
            from indexing.errors import ConfigError

            raise ConfigError(f"unknown queue(s) {', '.join(unknown)}; valid queues: {', '.join(QUEUES)}")
        argv = ["worker", "-Q", ",".join(qs), "-c", str(concurrency), "-l", loglevel, "--without-gossip", "--without-mingle"]
        if hostname:
            argv += ["-n", hostname]
        celery_app.worker_main(argv)
