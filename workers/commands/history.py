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
        file: Path = typer.Argument(..., help="events file: .csv (header user_id,product_id,event,timestamp) or .jsonl, optionally .gz"),
        as_json: bool = typer.Option(False, "--json", help='print {"stored", "duplicates", "rejected", "errors"} (first 100 errors)'),
        sql_url: Optional[str] = typer.Option(None, "--sql-url", help=SQL_URL_HELP),
        batch_size: int = typer.Option(20_000, "--batch-size", min=1, help="events per transaction"),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress bar (default: when stderr is a TTY)"),
    ) -> None:
        """Import events (idempotent: re-importing a file stores nothing twice); bad rows are reported, not fatal."""
        from rerank.history.ingest import import_events_file
        from rerank.history.store import HistoryStore

        with HistoryStore(_sql_url(sql_url)) as store:
            summary = import_events_file(store, file, batch_size=batch_size, progress=progress)
        if as_json:
            typer.echo(json.dumps(summary.to_dict(max_errors=100)))
            return
        typer.echo(f"stored {summary.stored}, duplicates {summary.duplicates}, rejected {summary.rejected}")
        for row, reason in summary.errors[:20]:
            typer.echo(f"  row {row}: {reason}")
        if summary.rejected > 20:
            typer.echo(f"  ... {summary.rejected - 20} more rejected rows (use --json for the first 100)")

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
    ) -> None:
        """Import throughput and profile latency (cold from SQL, warm from the cache)."""
        from rerank.bench_history import run_history_bench

        result = run_history_bench(sql_url, users=users, events=events_n, products=products, samples=samples, seed=seed)
        typer.echo(json.dumps(result, indent=None if as_json else 2))
