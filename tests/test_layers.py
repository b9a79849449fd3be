"""The layout's rules, read from the source with ``ast`` (function-level imports included; imports under
``if TYPE_CHECKING:`` are annotations only and do not count):

* layers import downwards only: ``mappings`` <- ``indexing`` <- ``rerank`` <- ``workers``;
* no module imports itself back through others (no import cycle);
* training never imports evaluation (the harness imports training);
* the replay path of ``fusionrank bench batch`` stays light: numpy, torch and safetensors only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"mappings": 0, "indexing": 1, "rerank": 2, "workers": 3}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in LAYERS:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[tuple[str, int]]:
    """``(imported project module, line)`` of every import in ``path`` outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            names = [f"{pkg}.{a.name}" if _resolve(f"{pkg}.{a.name}") == f"{pkg}.{a.name}" else pkg for a in node.names]
        else:
            continue
        for n in names:
            target = _resolve(n)
            if target is not None and target != module:
                out.add((target, node.lineno))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_the_reader_sees_the_imports_it_checks() -> None:
    # a check that reads nothing passes everything: the reader must see known edges, function-level ones included
    assert any(t == "rerank.reranker" for t, _ in GRAPH["workers.composition"])  # a function-level import
    assert any(t == "indexing.fields" for t, _ in GRAPH["rerank.reranker"])


def test_layers_import_downwards_only() -> None:
    up = [f"{m} (line {ln}) imports {t}" for m, edges in GRAPH.items() for t, ln in edges
          if LAYERS[t.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert not up, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(up))


def _cycles() -> list[list[str]]:
    graph = {m: sorted({t for t, _ in edges}) for m, edges in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_training_never_imports_evaluation() -> None:
    bad = [f"{m} imports {t}" for m, edges in GRAPH.items() if m.startswith("rerank.training") for t, _ in edges
           if t.startswith("rerank.evaluation")]
    assert not bad, bad


def test_the_gpu_replay_path_needs_only_numpy_torch_and_safetensors() -> None:
    code = ("import sys, workers.bench.batch, rerank.model.ranker; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'fastapi', 'opensearchpy', 'celery', "
            "'sentence_transformers', 'timm', 'onnxruntime', 'tantivy', 'pydantic', 'lightgbm'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert out == "[]", f"heavy packages imported on the replay path: {out}"
