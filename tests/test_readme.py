"""The README is run: its two commands match .ci/run, every `fusionrank ...` line names a real command
with real options, and its Python snippets execute."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from workers.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", TEXT, flags=re.S)
#: the guide's details (docs/*.md): their commands and snippets are checked and run like the README's
GUIDES = [README, *sorted((ROOT / "docs").glob("*.md"))]
ALL_BLOCKS = [
    (path.relative_to(ROOT).as_posix(), lang, body)
    for path in GUIDES
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)
]


def _fusionrank_lines() -> list[str]:
    lines = []
    for _, lang, body in ALL_BLOCKS:
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
    # docs/benchmarks.md records what was run and measured (its snippets need that day's data): not run here
    snippets = [(name, body) for name, lang, body in ALL_BLOCKS if lang == "python" and name != "docs/benchmarks.md"]
    assert snippets
    for name, body in snippets:
        exec(compile(body, name, "exec"), {})


def test_the_readme_is_a_guide_with_the_drop_in_call_right_after_the_two_commands():
    lines = TEXT.splitlines()
    assert len(lines) <= 400, f"the README has {len(lines)} lines: details belong in docs/"
    heads = [i for i, l in enumerate(lines) if l.startswith("## ")]
    names = [lines[i][3:] for i in heads]
    assert names[:2] == ["The two commands", "The drop-in rerank call"], names
    start = heads[1]
    assert any(l.strip().startswith("from rerank import Reranker") for l in lines[start : start + 10])


def test_every_link_in_the_guides_points_at_a_file_that_exists():
    for path in GUIDES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to a missing {target}"
