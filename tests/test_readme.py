"""The README is run: its two commands match .ci/run, every `fusionrank ...` line names a real command
with real options, and its Python snippets execute."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from workers.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", TEXT, flags=re.S)


def _fusionrank_lines() -> list[str]:
    lines = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"(?:^|\s|/)fusionrank\s+(.*)$", line)
            if m and not line.startswith(("python", "from", "import")):
                lines.append(m.group(1).split("&&")[0].strip())
    return lines


def test_the_two_commands_open_the_readme_and_ci_runs_the_test_command():
    first = BLOCKS[0][1]
    cmds = [l for l in first.splitlines() if l.strip() and not l.startswith("#")]
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("fusionrank demo")
    ci = (README.parent / ".ci" / "run").read_text()
    assert cmds[1] in ci.splitlines(), "the README's test command and .ci/run disagree"


@pytest.mark.parametrize("line", _fusionrank_lines())
def test_every_readme_command_exists_with_its_options(line):
    words = [w for w in shlex.split(line.replace("...", "")) if w]
    path = []
    group = app
    import typer.main

    cmd = typer.main.get_command(app)
    while words and not words[0].startswith("-"):
        sub = getattr(cmd, "commands", {}).get(words[0])
        if sub is None:
            break  # a positional argument (e.g. a file)
        path.append(words.pop(0))
        cmd = sub
    assert path, f"README line names no fusionrank command: {line!r}"
    known = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    for w in words:
        if w.startswith("--"):
            assert w.split("=")[0] in known, f"{' '.join(path)}: README uses unknown option {w} (known: {sorted(known)})"
    res = CliRunner().invoke(group, [*path, "--help"])
    assert res.exit_code == 0, res.output


def test_python_snippets_run():
    snippets = [body for lang, body in BLOCKS if lang == "python"]
    assert snippets
    for body in snippets:
        exec(compile(body, "README.md", "exec"), {})
