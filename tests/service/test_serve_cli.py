"""``fusionrank serve`` start-up checks and ``fusionrank bench serve`` on tiny numbers (a real uvicorn subprocess)."""

from __future__ import annotations

import gc
import json

import pytest
from typer.testing import CliRunner

from workers.cli import app


def test_serve_refuses_to_start_without_an_api_key():
    r = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert r.exit_code == 2
    assert "FUSIONRANK_API_KEY" in r.output and "--no-auth" in r.output


@pytest.mark.slow
def test_bench_serve_synthetic_tiny():
    r = CliRunner().invoke(app, ["bench", "serve", "--synthetic", "--synthetic-size", "100", "--requests", "12",
                                 "--candidates", "50", "--concurrency", "1,4", "--server-workers", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert set(out["levels"]) == {"1", "4"}
    for lv in out["levels"].values():
        assert lv["requests"] == 12 and lv["errors"] == 0
        assert lv["rps"] > 0 and 0 < lv["p50_ms"] <= lv["p99_ms"] < 60_000
    assert isinstance(out["http_overhead_ms"], float)
    assert out["in_process_p50_ms"] > 0 and out["candidates"] == 50 and out["synthetic"] is True
    assert out["model_version"] and "encode" in out["in_process_stages_ms"]
    assert out["server_workers"] == 2  # no request met a worker still loading: errors == 0 above
    # queries encoded by the default (auto) query backend: onnx-q8 on this CPU, over the index's own encoder
    assert out["text_backend"] == "torch" and out["query_text_backend"] == "onnx-q8"
    assert gc.get_freeze_count() == 0  # the load generator froze its heap for the levels only
