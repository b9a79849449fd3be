"""``fusionrank model list | promote VERSION | rollback | retrain``: the model registry and the retraining loop.

The registry is the folder of the served model link (``<data_dir>/models``, ``current``; see
:mod:`rerank.model.registry`); a running ``fusionrank serve`` follows its ``current`` link (no restart, no failed
request).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _parse_options(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise typer.BadParameter(f"--option {it!r}: expected NAME=VALUE (a TrainConfig field)")
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def _echo_retrain(d: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(d, default=str))
        return
    typer.echo(f"{d['status']}: {d.get('reason', '')}")
    if d.get("version"):
        ev = d.get("evaluation") or {}
        typer.echo(f"candidate {d['version']} against {ev.get('against')}")
        for name in ("log", "qrels"):
            e = ev.get(name)
            if e:
                typer.echo(f"  {name:<5} NDCG@10 candidate {e['candidate']['ndcg@10']:.4f}, serving {e['serving']['ndcg@10']:.4f} "
                           f"({e['diff']:+.4f} on {e['queries']} queries)")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    mx = typer.Typer(help="Model versions: list, promote, rollback, and the retraining loop.", no_args_is_help=True)
    app.add_typer(mx, name="model")

    @mx.command("list")
    def list_cmd(as_json: bool = typer.Option(False, "--json"),
                 ledger: bool = typer.Option(False, "--ledger", help="Also print the ledger (promotions, rollbacks, retraining decisions).")) -> None:
        """Every model version in the registry, oldest first; `*` marks the served one."""
        from workers.retrain import registry_of
        from workers.settings import load_settings

        reg = registry_of(load_settings())
        vs = [v.to_dict() for v in reg.versions()]
        if as_json:
            typer.echo(json.dumps({"registry": str(reg.root), "current": reg.current(), "versions": vs,
                                   **({"ledger": reg.ledger()} if ledger else {})}, default=str))
            return
        typer.echo(f"registry {reg.root} (current: {reg.current() or 'none'})")
        for v in vs:
            nd = v["validation_ndcg@10"]
            typer.echo(f"  {'*' if v['current'] else ' '} {v['version']}  validation NDCG@10 {nd if nd is None else f'{nd:.4f}'}"
                       f"{'  from ' + v['trained_from'] if v['trained_from'] else ''}")
        if ledger:
            for e in reg.ledger():
                typer.echo(f"  {e.get('at')} {e.get('action')} {e.get('version')} {e.get('decision', '')} {e.get('reason', '')}")

    @mx.command("promote")
    def promote_cmd(version: str = typer.Argument(..., help="A version from `fusionrank model list`."),
                    reason: str = typer.Option("by hand", "--reason"), as_json: bool = typer.Option(False, "--json")) -> None:
        """Serve VERSION (the `current` link moves atomically; a running service follows it)."""
        from workers.retrain import registry_of
        from workers.settings import load_settings

        e = registry_of(load_settings()).promote(version, reason=reason)
        typer.echo(json.dumps(e) if as_json else f"serving {e['version']} (was {e['previous'] or 'none'})")

    @mx.command("rollback")
    def rollback_cmd(reason: str = typer.Option("by hand", "--reason"), as_json: bool = typer.Option(False, "--json")) -> None:
        """Serve the version that served before the current one."""
        from workers.retrain import registry_of
        from workers.settings import load_settings

        e = registry_of(load_settings()).rollback(reason=reason)
        typer.echo(json.dumps(e) if as_json else f"serving {e['version']} (rolled back from {e['previous']})")

    @mx.command("retrain")
    def retrain_cmd(
        force: bool = typer.Option(False, "--force", help="Train even when fewer than FUSIONRANK_RETRAIN_MIN_NEW_EVENTS new events arrived."),
        queries: Optional[Path] = typer.Option(None, "--queries", help="Also judge the candidate on these queries (with --qrels)."),
        qrels: Optional[Path] = typer.Option(None, "--qrels", help="TREC qrels of --queries."),
        option: list[str] = typer.Option([], "--option", help="Training option NAME=VALUE (a TrainConfig field, e.g. epochs=10); repeatable."),
        via: str = typer.Option("inline", "--via", help="inline (this process) | celery (the admin queue; waits for the result)."),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="--via celery: stop waiting after this many seconds."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """One turn of the retraining loop: retrain from the store's UBI log, compare with the serving model on
        held-out behaviour, promote only when better by FUSIONRANK_RETRAIN_MARGIN."""
        from workers.settings import load_settings

        opts = _parse_options(option)
        settings = load_settings()
        if via == "celery":
            from workers.celery_app import create_app

            res = create_app(settings).send_task("fusionrank.model.retrain", kwargs={
                "force": force, "queries": str(queries.resolve()) if queries else None, "qrels": str(qrels.resolve()) if qrels else None,
                "options": opts or None})
            out = res.get(timeout=timeout)
        elif via == "inline":
            from workers.retrain import retrain

            out = retrain(settings, force=force, queries=queries, qrels=qrels, options=opts or None, progress=False)
        else:
            raise typer.BadParameter(f"--via must be inline or celery, got {via!r}")
        _echo_retrain(out, as_json)
