"""``fusionrank drill``: the reliability drills (dependencies down, hostile input, load) as one JSON report."""

from __future__ import annotations

import json
import sys

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("drill")
    def drill_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object on one line."),
        load_seconds: float = typer.Option(600.0, "--load-seconds", min=1.0, help="Length of the final load drill (CI uses 60)."),
        hold_seconds: float = typer.Option(5.0, "--hold-seconds", min=1.0, help="How long each dependency stays down."),
        clients: int = typer.Option(4, "--clients", min=1, max=64, help="Closed-loop load clients running through every drill."),
        products: int = typer.Option(300, "--products", min=100, help="Products in the drill's synthetic catalog."),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Stop Redis and PostgreSQL, break the engine, make the model raise, send hostile requests and hold a load,
        all against a served synthetic world on private local servers; per drill: requests, failed, lost, 5xx."""
        from workers.drill.drill import run_drills

        say = (lambda m: typer.echo(f"[drill] {m}", err=True)) if sys.stderr.isatty() or not as_json else None
        report = run_drills(hold_s=hold_seconds, load_s=load_seconds, clients=clients, size=products, seed=seed, progress=say)
        typer.echo(json.dumps(report) if as_json else json.dumps(report, indent=2))
        bad = {k: v for k, v in report["drills"].items() if v["lost"] or v["unexpected_5xx"] or v["transport_errors"] or v.get("recovered") is False}
        if bad:
            typer.echo(f"drill failed: {sorted(bad)} lost something, answered an unexpected 5xx or did not recover", err=True)
        if any(report["secrets_seen"].values()):
            typer.echo(f"drill failed: a key or password showed up in {report['secrets_seen']}", err=True)
        if bad or any(report["secrets_seen"].values()):
            raise typer.Exit(1)
