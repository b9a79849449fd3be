"""``fusionrank serve`` start-up checks and ``fusionrank bench serve`` on tiny numbers (a real uvicorn subprocess)."""

from __future__ import annotations

import gc
import json
import sys

import pytest
from typer.testing import CliRunner

from indexing.errors import ConfigError
from workers.cli import app
from workers.commands import serve as S


def test_serve_refuses_to_start_without_an_api_key():
    r = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert r.exit_code == 2
    assert "FUSIONRANK_API_KEY" in r.output and "--no-auth" in r.output


@pytest.mark.parametrize("raw, ms", [(None, 1.0), ("0.5", 0.5), (" 5 ", 5.0), ("1000", 1000.0)])
def test_switch_interval_setting(monkeypatch, raw, ms):
    if raw is None:
        monkeypatch.delenv(S.SWITCH_INTERVAL_ENV, raising=False)
    else:
        monkeypatch.setenv(S.SWITCH_INTERVAL_ENV, raw)
    assert S.switch_interval_ms() == ms


@pytest.mark.parametrize("raw", ["fast", "0", "-1", "nan", "inf", "1001"])
def test_switch_interval_setting_refuses_what_is_not_a_duration(monkeypatch, raw):
    monkeypatch.setenv(S.SWITCH_INTERVAL_ENV, raw)
    with pytest.raises(ConfigError, match=rf"{S.SWITCH_INTERVAL_ENV}: .*\(got '{raw}'\)"):
        S.switch_interval_ms()


def test_setup_server_process_caps_threads_and_sets_the_switch_interval(monkeypatch):
    import indexing.encoders as E

    capped = []
    monkeypatch.setattr(E, "limit_threads", capped.append)
    monkeypatch.setenv(S.SWITCH_INTERVAL_ENV, "2.5")
    S.setup_server_process(3)  # the autouse fixture restores the interval afterwards
    assert capped == [3]
    assert sys.getswitchinterval() == pytest.approx(0.0025)


def test_serve_refuses_a_bad_switch_interval_before_loading(monkeypatch):
    monkeypatch.setenv("FUSIONRANK_API_KEY", "k" * 24)
    monkeypatch.setenv(S.SWITCH_INTERVAL_ENV, "fast")
    r = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert r.exit_code == 2
    assert S.SWITCH_INTERVAL_ENV in r.output and "'fast'" in r.output


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
    assert out["machine"]["cpu_count"] == out["cpu_count"] and set(out["machine"]) >= {"cpu_model", "cpu_isa"}
    assert out["server_workers"] == 2  # no request met a worker still loading: errors == 0 above
    assert "thread switch interval 1 ms" in out["server"]  # the server's default, stated in the output
    # queries encoded by the default (auto) query backend: onnx-q8 on this CPU, over the index's own encoder
    assert out["text_backend"] == "torch" and out["query_text_backend"] == "onnx-q8"
    assert gc.get_freeze_count() == 0  # the load generator froze its heap for the levels only


@pytest.mark.slow
def test_bench_batch_builds_saves_and_replays_a_served_world(tmp_path, monkeypatch):
    from workers.bench.serve import build_synthetic_world

    for k, v in build_synthetic_world(tmp_path / "world", size=120).items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "features.npz"
    saved = CliRunner().invoke(app, ["bench", "batch", "--save-features", str(path), "--requests", "5", "--candidates", "20"])
    assert saved.exit_code == 0, saved.output
    info = json.loads(saved.output.strip().splitlines()[-1])
    assert info["requests"] == 5 and info["bytes"] == path.stat().st_size and info["candidates"] == 20
    r = CliRunner().invoke(app, ["bench", "batch", "--features", str(path), "--device", "cpu", "--levels", "1,3", "--per-level", "9"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert set(out["levels"]) == {"1", "3"} and out["device"] == "cpu" and out["distinct_requests"] == 5
    assert all(lv[m]["requests"] == 9 for lv in out["levels"].values() for m in ("direct", "micro_batched"))
    assert out["candidates_median"] == 20 and out["features"]["candidates"] == 20
    once = CliRunner().invoke(app, ["bench", "batch", "--requests", "2", "--candidates", "10", "--levels", "2", "--per-level", "4"])
    assert once.exit_code == 0, once.output  # neither option: build here, then run
    assert json.loads(once.output.strip().splitlines()[-1])["distinct_requests"] == 2
    both = CliRunner().invoke(app, ["bench", "batch", "--features", str(path), "--save-features", str(path)])
    assert both.exit_code == 2 and "not both" in both.output
