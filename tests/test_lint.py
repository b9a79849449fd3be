"""The lint rules of pyproject.toml ([tool.ruff]) hold for the whole repository: the test command runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing() -> None:
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"ruff check failed (fix it, or `ruff check --fix`):\n{res.stdout}{res.stderr}"
