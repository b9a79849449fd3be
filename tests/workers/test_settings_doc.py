"""Settings in one place: every ``FUSIONRANK_*`` variable is a field of :class:`workers.settings.Settings`, documented
in docs/configuration.md's table, and read from the environment nowhere but through that class."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"FUSIONRANK_" + name.upper() for name in Settings.model_fields}
TABLE = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def test_the_configuration_table_lists_exactly_the_settings_fields() -> None:
    rows = [l for l in TABLE.splitlines() if l.startswith("| `")]
    names = {re.match(r"\| `([A-Z0-9_]+)`", r).group(1) for r in rows}
    assert names - {"OMP_NUM_THREADS"} == FIELDS, {"undocumented": sorted(FIELDS - names), "not settings": sorted(names - FIELDS - {"OMP_NUM_THREADS"})}


def test_every_fusionrank_variable_named_in_the_guides_and_the_code_is_a_setting() -> None:
    places = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    places += [p for pkg in ("mappings", "indexing", "rerank", "workers") for p in sorted((ROOT / pkg).rglob("*.py"))]
    places += [ROOT / "docker-compose.yml"]
    unknown = set()
    for p in places:
        if p.name == "benchmarks.md":  # records what ran on a given day, under that day's names
            continue
        for name in re.findall(r"FUSIONRANK_[A-Z0-9_]*[A-Z0-9]", p.read_text(encoding="utf-8")):
            if name not in FIELDS:
                unknown.add(f"{p.relative_to(ROOT)}: {name}")
    assert not unknown, sorted(unknown)


def _environment_reads(tree: ast.AST) -> list[tuple[int, ast.expr]]:
    """``(line, key expression)`` of every ``os.environ.get(k)``, ``os.getenv(k)`` and ``os.environ[k]`` read."""
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            f = ast.unparse(node.func)
            if f.endswith(("environ.get", "getenv")):
                reads.append((node.lineno, node.args[0]))
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and ast.unparse(node.value).endswith("environ"):
            reads.append((node.lineno, node.slice))
    return reads


def test_no_fusionrank_variable_is_read_from_the_environment_outside_the_settings() -> None:
    bad = []
    for pkg in ("mappings", "indexing", "rerank", "workers"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if p == ROOT / "workers" / "settings.py":
                continue
            tree = ast.parse(p.read_text(encoding="utf-8"))
            consts = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                      and isinstance(n.value.value, str) for t in n.targets if isinstance(t, ast.Name)}
            for line, key in _environment_reads(tree):
                value = key.value if isinstance(key, ast.Constant) else consts.get(key.id) if isinstance(key, ast.Name) else None
                if isinstance(value, str) and value.startswith("FUSIONRANK_"):
                    bad.append(f"{p.relative_to(ROOT)}:{line} reads {value}")
    assert not bad, bad


def test_the_check_sees_an_environment_read() -> None:
    tree = ast.parse('import os\nX = "FUSIONRANK_Y"\nos.environ.get(X)\nos.getenv("A")\nos.environ["B"]\nos.environ["C"] = "1"\n')
    keys = [ast.unparse(k) for _, k in _environment_reads(tree)]
    assert sorted(keys) == sorted(["X", "'A'", "'B'"])  # the write to C is not a read
