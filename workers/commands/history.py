"""CLI of the user-history store: ``fusionrank db ...``, ``fusionrank events import``, ``fusionrank bench history``.

The SQL URL is ``--sql-url`` when given, else the settings' ``effective_sql_url`` (``FUSIONRANK_SQL_URL``,
or the SQLite file ``history.sqlite3`` in the data dir).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

SQL_URL_HELP = "SQLAlchemy URL of the history store (default: FUSIONRANK_SQL_URL, else SQLite in the data dir)"


def _sql_url(sql_url: str | None) -> str:
    if sql_url:
        return sql_url
    from workers.settings import load_settings

    return load_settings().effective_sql_url


def register(app: typer.Typer, bench: typer.Typer) -> None:
    db = typer.Typer(help="History-store database: schema migrations (Alembic).", no_args_is_help=True)
    events = typer.Typer(help="User events (view / click / add_to_cart / purchase).", no_args_is_help=True)
    app.add_typer(db, name="db")
    app.add_typer(events, name="events")

    @db.command("upgrade")
    def db_upgrade(
        revision: str = typer.Argument("head", help="target revision"),
        sql_url: Optional[str] = typer.Option(None, "--sql-url", help=SQL_URL_HELP),
    ) -> None:
        """Apply the history-store migrations (creates the SQLite file when needed)."""
        from rerank.history.store import redact, upgrade

        url = _sql_url(sql_url)
        rev = upgrade(url, revision)
        typer.echo(f"{redact(url)}: at revision {rev}")

    @db.command("downgrade")
    def db_downgrade(
        revision: str = typer.Argument("-1", help="target revision (-1: one step back, base: drop everything)"),
        sql_url: Optional[str] = typer.Option(None, "--sql-url", help=SQL_URL_HELP),
    ) -> None:
        """Revert history-store migrations (``base`` drops the tables and their data)."""
        from rerank.history.store import downgrade, redact

        url = _sql_url(sql_url)
        rev = downgrade(url, revision)
        typer.echo(f"{redact(url)}: at revision {rev or 'base (no schema)'}")

    @db.command("current")
    def db_current(sql_url: Optional[str] = typer.Option(None, "--sql-url", help=SQL_URL_HELP)) -> None:
        """Print the database's schema revision and this version's head."""
        from rerank.history.store import current_revision, head_revision, redact

        url = _sql_url(sql_url)
        rev, head = current_revision(url), head_revision()
        state = "up to date" if rev == head else "run `fusionrank db upgrade`"
        typer.echo(f"{redact(url)}: revision {rev or 'none'} (head {head}; {state})")

    @events.command("import")
    def events_import(
        file: Optional[Path] = typer.Argument(None, help="events: .csv (header user_id,product_id,event,timestamp) or .jsonl, optionally .gz; "
                                              "or a UBI 1.3 log: a folder or .jsonl[.gz] file of UBI queries and/or events"),
        as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object (first 100 errors)"),
        sql_url: Optional[str] = typer.Option(None, "--sql-url", help=SQL_URL_HELP),
        batch_size: int = typer.Option(20_000, "--batch-size", min=1, help="events per transaction"),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress bar (default: when stderr is a TTY)"),
        from_opensearch: bool = typer.Option(False, "--from-opensearch", help="read the UBI indices of the cluster at --opensearch-url "
                                             "(default FUSIONRANK_OPENSEARCH_URL) instead of a file"),
        opensearch_url: Optional[str] = typer.Option(None, "--opensearch-url", help="cluster URL for --from-opensearch"),
        queries_index: str = typer.Option("ubi_queries", "--queries-index", help="--from-opensearch: the UBI queries index"),
        events_index: str = typer.Option("ubi_events", "--events-index", help="--from-opensearch: the UBI events index"),
        catalog: Optional[Path] = typer.Option(None, "--catalog", help="UBI: count events on products this catalog does not have"),
    ) -> None:
        """Import events (idempotent: re-importing stores nothing twice); bad rows are reported, not fatal.

        UBI logs (a folder, a UBI .jsonl file, or --from-opensearch) go to the searches/shown/events tables, and their
        view/click/add_to_cart/purchase events with a user feed that user's history."""
        from indexing.errors import ConfigError
        from rerank.history.ingest import import_events_file
        from rerank.history.store import HistoryStore
        from rerank.history.ubi import is_ubi_path

        if (file is None) == (not from_opensearch):
            raise ConfigError("give an events FILE (or UBI folder), or --from-opensearch, not both")
        if from_opensearch or is_ubi_path(file):  # type: ignore[arg-type]
            _ubi_import(file, as_json=as_json, sql_url=sql_url, batch_size=batch_size, opensearch_url=opensearch_url if from_opensearch else None,
                        from_opensearch=from_opensearch, queries_index=queries_index, events_index=events_index, catalog=catalog)
            return
        with HistoryStore(_sql_url(sql_url)) as store:
            summary = import_events_file(store, file, batch_size=batch_size, progress=progress)  # type: ignore[arg-type]
        if as_json:
            typer.echo(json.dumps(summary.to_dict(max_errors=100)))
            return
        typer.echo(f"stored {summary.stored}, duplicates {summary.duplicates}, rejected {summary.rejected}")
        for row, reason in summary.errors[:20]:
            typer.echo(f"  row {row}: {reason}")
        if summary.rejected > 20:
            typer.echo(f"  ... {summary.rejected - 20} more rejected rows (use --json for the first 100)")

    @events.command("click-models")
    def events_click_models(
        log: Optional[Path] = typer.Argument(None, help="UBI log (folder or .jsonl[.gz] file); without it, the UBI log in the history store"),
        sql_url: Optional[str] = typer.Option(None, "--sql-url", help=SQL_URL_HELP),
        holdout: float = typer.Option(0.2, "--holdout", min=0.01, max=0.9, help="share of searches held out"),
        cap: int = typer.Option(3, "--cap", min=1, help="spam capping: searches counted per (client, query)"),
        seed: int = typer.Option(13, "--seed"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    ) -> None:
        """Fit the click models (pbm by EM, sdbn, naive ctr) on a UBI log and compare them on held-out searches."""
        from rerank.datasets import clicks as C

        if log is not None:
            from rerank.history.ubi import read_log

            queries, evs, errors = read_log(log)
        else:
            from rerank.history.store import HistoryStore

            with HistoryStore(_sql_url(sql_url)) as store:
                queries, evs = store.ubi_log()
            errors = []
        sessions, counts = C.sessions_from_log(queries, evs)
        capped, stats = C.cap_sessions(sessions, max_sessions_per_client_query=cap)
        res = {"bad_lines": len(errors), **counts, "spam_capping": stats.to_dict(), **C.compare(capped, holdout=holdout, seed=seed)}
        if as_json:
            typer.echo(json.dumps(res))
            return
        typer.echo(f"{res['train_sessions']} training searches, {res['test_sessions']} held out; spam capping {stats.to_dict()}")
        for name, m in res["models"].items():
            typer.echo(f"  {name:5s} held-out log-likelihood {m['log_likelihood']:.5f} per result, perplexity {m['perplexity']:.4f}")
        th = res["models"]["pbm"].get("theta")
        if th:
            typer.echo("  pbm examination by rank: " + " ".join(f"{x:.2f}" for x in th))

    @bench.command("history")
    def bench_history(
        as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
        users: int = typer.Option(10_000, "--users", min=1),
        events_n: int = typer.Option(500_000, "--events", min=1),
        products: int = typer.Option(12_000, "--products", min=1),
        samples: int = typer.Option(2_000, "--samples", min=1, help="profile reads timed (cold and warm)"),
        sql_url: Optional[str] = typer.Option(
            None, "--sql-url", help="database to benchmark (PostgreSQL: in a fresh schema, dropped after); default: a temporary SQLite file"
        ),
        seed: int = typer.Option(0, "--seed"),
        ubi_searches: int = typer.Option(15_000, "--ubi-searches", min=1, help="searches of the synthetic UBI log imported (about 12 events each)"),
        retrain_log: Optional[Path] = typer.Option(None, "--retrain-log", help="also time one forced turn of the retraining loop on this "
                                                   "UBI log (e.g. ../shared/data/fashion/bench/dev/ubi) in a scratch store and registry: retrain_s"),
        retrain_minutes: float = typer.Option(1.0, "--retrain-minutes", min=0.01, help="--retrain-log: the training budget of that turn"),
    ) -> None:
        """Import throughput (events CSV; a UBI log, imported twice) and profile latency (cold from SQL, warm from the cache)."""
        from workers.bench.history import run_history_bench

        settings = None
        if retrain_log is not None:
            from workers.settings import load_settings

            settings = load_settings()
        result = run_history_bench(sql_url, users=users, events=events_n, products=products, samples=samples, seed=seed, ubi_searches=ubi_searches,
                                   retrain_log=retrain_log, retrain_minutes=retrain_minutes, settings=settings)
        typer.echo(json.dumps(result, indent=None if as_json else 2))


def _catalog_ids(path: Path) -> set[str]:
    import csv

    from indexing.errors import ConfigError

    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        col = next((c for c in ("product_id", "id", "_id") if c in (reader.fieldnames or [])), None)
        if col is None:
            raise ConfigError(f"--catalog {path}: no product_id column (header {reader.fieldnames})")
        return {row[col] for row in reader if row.get(col)}


def _ubi_import(file: Path | None, *, as_json: bool, sql_url: str | None, batch_size: int, opensearch_url: str | None, from_opensearch: bool,
                queries_index: str, events_index: str, catalog: Path | None) -> None:
    from rerank.history.store import HistoryStore
    from rerank.history.ubi import iter_records
    from rerank.history.ubi_ingest import import_ubi, iter_opensearch_records

    ids = _catalog_ids(catalog) if catalog is not None else None
    engine = None
    if from_opensearch:
        from workers.commands.opensearch import build_opensearch_engine
        from workers.settings import load_settings

        engine = build_opensearch_engine(load_settings(), opensearch_url)
        records = iter_opensearch_records(engine.client, queries_index=queries_index, events_index=events_index)
    else:
        records = iter_records(file)  # type: ignore[arg-type]
    try:
        with HistoryStore(_sql_url(sql_url)) as store:
            summary = import_ubi(store, records, catalog_ids=ids, batch_size=batch_size, epoch_ms_timestamps=from_opensearch)
    finally:
        if engine is not None:
            engine.close()
    d = summary.to_dict(max_errors=100)
    if as_json:
        typer.echo(json.dumps(d))
        return
    typer.echo(f"UBI: searches stored {summary.queries_stored} (duplicates {summary.queries_duplicate}), events stored {summary.events_stored} "
               f"(duplicates {summary.events_duplicate}), history events {summary.history_events_stored}, rejected {summary.rejected}, "
               f"orphaned {summary.orphaned}, without position {summary.without_position}, unknown products "
               f"{summary.unknown_products if ids is not None else 'not checked (no --catalog)'}")
    for src, line, reason in summary.errors[:20]:
        typer.echo(f"  {src}:{line}: {reason}")
    if summary.rejected > 20:
        typer.echo(f"  ... {summary.rejected - 20} more rejected lines (use --json for the first 100)")
