"""The ``fusionrank`` command line: the composition root that reads settings and wires the parts.

Sub-commands live in ``workers/commands/<area>.py``; each module exposes ``register(app, bench)``
and is discovered here, so areas do not edit one another's files. Heavy libraries (torch, models,
engines) are imported inside the commands, never at import time, so ``fusionrank --help`` is fast.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys

import typer

from indexing.errors import FusionRankError

app = typer.Typer(
    name="fusionrank",
    help="Multimodal, personalized reranking for OpenSearch product search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench = typer.Typer(help="Benchmarks: each prints one JSON object (compare ratios measured in one run).", no_args_is_help=True)
app.add_typer(bench, name="bench")


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from indexing.errors import ConfigError
    from workers.settings import apply_process_settings, load_settings

    try:
        apply_process_settings(load_settings())
    except ConfigError:
        pass  # the command itself loads the settings and says what is wrong with them


@app.command("config")
def config_cmd() -> None:
    """Print the effective settings as JSON (secrets redacted)."""
    from workers.settings import load_settings

    typer.echo(json.dumps(load_settings().redacted(), indent=2, sort_keys=True))


def _discover() -> None:
    import workers.commands as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        module = importlib.import_module(f"{pkg.__name__}.{mod}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app, bench)


_discover()


def main() -> None:
    """Console-script entry point: project errors become one clear line and exit code 2."""
    try:
        app()
    except FusionRankError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
