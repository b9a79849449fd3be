import pytest

from workers.bench.index import run_index_bench
from workers.settings import load_settings

pytestmark = pytest.mark.slow


def test_bench_index_measures_raw_encoders_and_the_pipeline_on_the_same_products(shared_data):
    out = run_index_bench(
        load_settings(device="cpu"),
        catalog=shared_data / "fashion" / "bench" / "catalog.csv",
        images_root=shared_data / "fashion",
        limit=12,
        batch_size=5,
    )
    assert out["products"] == out["indexed"] == 12 and out["failed"] == 0
    assert out["machine"]["cpu_count"] and "cpu_isa" in out["machine"]
    for k in ("text_docs_per_s", "image_docs_per_s", "pipeline_docs_per_s", "raw_encoder_docs_per_s"):
        assert out[k] > 0
    # the pipeline does everything the raw encoders do plus I/O, so it cannot be much faster than them
    assert out["pipeline_s"] > 0.5 * out["raw_encoder_s"]
    # the JSON's seconds are rounded to 0.01 s: allow exactly the error that rounding can cause
    p, r = out["pipeline_s"], out["raw_encoder_s"]
    rounding = 100 * (0.005 / r + (p + 0.005) * 0.005 / (r * (r - 0.005))) + 0.05
    assert out["overhead_pct"] == pytest.approx(100 * (p - r) / r, abs=rounding)
