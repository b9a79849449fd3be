"""``fusionrank reindex start|status|resume|rollback|cleanup|abandon`` and ``fusionrank bench reindex``.

Job records live in the history store's SQL database (``FUSIONRANK_SQL_URL`` or the SQLite file in the
data dir; run ``fusionrank db upgrade`` once).
"""

from __future__ import annotations

from contextlib import contextmanager

import json
from pathlib import Path
from typing import Optional

import typer

from workers.commands import bench_engine_option as engine_opt

ALIAS_HELP = "Index alias (default: FUSIONRANK_INDEX_ALIAS or products)."


@contextmanager
def _ctx(engine: str | None, alias: str | None, sql_url: str | None = None):
    """Settings, engine and job store of one command; both are closed when the command ends."""
    from workers.composition import build_engine
    from workers.reindex_jobs import ReindexJobStore
    from workers.settings import load_settings

    settings = load_settings(engine=engine, index_alias=alias, sql_url=sql_url)
    eng = build_engine(settings)
    try:
        store = ReindexJobStore(settings.effective_sql_url)
    except BaseException:
        eng.close()
        raise
    try:
        yield settings, eng, store
    finally:
        store.close()
        eng.close()


def _echo_summary(d: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(d))
        return
    typer.echo(
        f"job {d['job_id']}: {d['status']}; {d['source']} -> {d['target']} ({d['docs']} docs: copied {d['copied']}, "
        f"re-encoded {d['reencoded']}, unchanged {d['unchanged']}, failed {d['failed']}) in {d['seconds']:.1f} s"
    )
    if d["status"] == "done":
        typer.echo(f"alias {d['alias']} -> {d['target']} (was {', '.join(d['previous']) or 'unset'})")
    for pid, reason in d["errors"][:10]:
        typer.echo(f"  id {pid}: {reason}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    rx = typer.Typer(help="Index generations behind the alias: reindex, status, rollback, cleanup.", no_args_is_help=True)
    app.add_typer(rx, name="reindex")

    @rx.command("start")
    def start_cmd(
        mapping: Optional[str] = typer.Option(None, "--mapping", help="Mapping file of the new generation (default: FUSIONRANK_MAPPING)."),
        text_model: Optional[str] = typer.Option(None, "--text-model", help="Text encoder (default: FUSIONRANK_TEXT_MODEL)."),
        text_backend: Optional[str] = typer.Option(None, "--text-backend", help="torch | onnx-int8 | onnx-q8 (default: FUSIONRANK_TEXT_BACKEND)."),
        image_model: Optional[str] = typer.Option(None, "--image-model", help="Image encoder (default: FUSIONRANK_IMAGE_MODEL)."),
        images_root: Optional[Path] = typer.Option(None, "--images-root", help="Folder the documents' image paths are relative to (needed when the image model changes)."),
        via: str = typer.Option("inline", "--via", help="inline | celery (fill batches on the embed queue)."),
        batch_size: int = typer.Option(256, "--batch-size", min=1, max=10_000),
        engine: Optional[str] = typer.Option(None, "--engine"),
        alias: Optional[str] = typer.Option(None, "--alias", help=ALIAS_HELP),
        sql_url: Optional[str] = typer.Option(None, "--sql-url", help="Job-record database (default: the history store)."),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="--via celery: stop waiting after this many seconds."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """New generation from the mapping, filled from the current one (vectors reused where models are unchanged),
        verified, then the alias swapped atomically. The old generation is kept."""
        from workers.reindex_jobs import make_plan, start_job

        with _ctx(engine, alias, sql_url) as (settings, eng, store):
            plan = make_plan(
                eng, alias=settings.index_alias, mapping=mapping or settings.mapping, text_model=text_model or settings.text_model,
                text_backend=text_backend or settings.text_backend, image_model=image_model or settings.image_model,
                images_root=str(images_root.resolve()) if images_root else None, device=settings.device,
                batch_size=batch_size, hnsw_engine=settings.hnsw_engine,
            )
            out = start_job(eng, store, plan, via=via, settings=settings, timeout_s=timeout).to_dict()
        _echo_summary(out, as_json)

    @rx.command("resume")
    def resume_cmd(
        engine: Optional[str] = typer.Option(None, "--engine"),
        alias: Optional[str] = typer.Option(None, "--alias", help=ALIAS_HELP),
        sql_url: Optional[str] = typer.Option(None, "--sql-url"),
        via: Optional[str] = typer.Option(None, "--via", help="inline | celery (default: as the job was started)."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Finish the alias's interrupted job from its record (finished batches are not redone)."""
        from workers.reindex_jobs import resume_job

        with _ctx(engine, alias, sql_url) as (settings, eng, store):
            kw = {"via": via} if via else {}
            out = resume_job(eng, store, settings.index_alias, settings=settings, **kw).to_dict()
        _echo_summary(out, as_json)

    @rx.command("status")
    def status_cmd(
        engine: Optional[str] = typer.Option(None, "--engine"),
        alias: Optional[str] = typer.Option(None, "--alias", help=ALIAS_HELP),
        sql_url: Optional[str] = typer.Option(None, "--sql-url"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Generations of the alias (with counts), the one it points at, and the newest job's progress."""
        from workers.reindex_jobs import status

        with _ctx(engine, alias, sql_url) as (settings, eng, store):
            out = status(eng, store, settings.index_alias)
        if as_json:
            typer.echo(json.dumps(out))
            return
        typer.echo(f"alias {out['alias']} -> {', '.join(out['current']) or 'nothing'}")
        for g in out["generations"]:
            typer.echo(f"  {'*' if g['current'] else ' '} {g['index']}  {g['count'] if g['count'] is not None else '?'} docs")
        j = out["job"]
        if j:
            typer.echo(
                f"last job {j['job_id']}: {j['status']} at step {j['step']}, batches {j['batches_done']}/{j['batches_total']} "
                f"({j['source']} -> {j['target']}, text {j['text_model']}/{j['text_backend']}, image {j['image_model']}, mapping {j['mapping']})"
            )
            if j["error"]:
                typer.echo(f"  error: {j['error']}")

    @rx.command("rollback")
    def rollback_cmd(
        to: Optional[str] = typer.Option(None, "--to", help="Generation to point at (default: the one the last job swapped away from)."),
        engine: Optional[str] = typer.Option(None, "--engine"),
        alias: Optional[str] = typer.Option(None, "--alias", help=ALIAS_HELP),
        sql_url: Optional[str] = typer.Option(None, "--sql-url"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Point the alias back at the previous generation, atomically."""
        from workers.reindex_jobs import rollback_alias

        with _ctx(engine, alias, sql_url) as (settings, eng, store):
            out = rollback_alias(eng, store, settings.index_alias, to)
        typer.echo(json.dumps(out) if as_json else f"alias {out['alias']} -> {out['to']} (was {', '.join(out['from'])})")

    @rx.command("cleanup")
    def cleanup_cmd(
        keep: int = typer.Option(..., "--keep", min=1, help="Generations to keep (newest first; the alias's own is always kept)."),
        engine: Optional[str] = typer.Option(None, "--engine"),
        alias: Optional[str] = typer.Option(None, "--alias", help=ALIAS_HELP),
        sql_url: Optional[str] = typer.Option(None, "--sql-url"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Delete old generations (never the alias's current one, nor an unfinished job's target)."""
        from workers.reindex_jobs import cleanup_generations

        with _ctx(engine, alias, sql_url) as (settings, eng, store):
            deleted = cleanup_generations(eng, store, settings.index_alias, keep)
        typer.echo(json.dumps({"deleted": deleted}) if as_json else (f"deleted {', '.join(deleted)}" if deleted else "nothing to delete"))

    @rx.command("abandon")
    def abandon_cmd(
        engine: Optional[str] = typer.Option(None, "--engine"),
        alias: Optional[str] = typer.Option(None, "--alias", help=ALIAS_HELP),
        sql_url: Optional[str] = typer.Option(None, "--sql-url"),
    ) -> None:
        """Give up the alias's unfinished job and delete its (never served) target generation."""
        from workers.reindex_jobs import abandon_job

        with _ctx(engine, alias, sql_url) as (settings, eng, store):
            j = abandon_job(eng, store, settings.index_alias)
        typer.echo(f"job {j.job_id} abandoned; {j.target} deleted")

    @bench.command("reindex")
    def bench_reindex_cmd(
        limit: int = typer.Option(2000, "--limit", min=1, help="Products of the source index (built first, inline)."),
        catalog: Optional[Path] = typer.Option(None, "--catalog", help="Default: <shared data>/fashion/bench/catalog.csv."),
        images_root: Optional[Path] = typer.Option(None, "--images-root", help="Default: <shared data>/fashion."),
        batch_size: int = typer.Option(256, "--batch-size", min=1),
        as_json: bool = typer.Option(False, "--json"),
        engine: Optional[str] = engine_opt.option(),
    ) -> None:
        """Reindex with unchanged models (vectors reused) and with a changed text model, under concurrent searches."""
        from workers.bench.reindex import run_reindex_bench
        from workers.settings import load_settings

        engine_name = engine_opt.use(engine)
        settings = load_settings()
        cat, root = settings.fashion_bench(catalog, images_root)
        out = {"engine": engine_name, **run_reindex_bench(settings, catalog=cat, images_root=root, limit=limit, batch_size=batch_size)}
        if as_json:
            typer.echo(json.dumps(out))
        else:
            for k, v in out.items():
                typer.echo(f"{k:>24}  {v}")
