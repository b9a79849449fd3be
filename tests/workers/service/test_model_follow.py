"""The service follows the model registry: a promotion (or rollback) is loaded in the background and swapped in
while requests keep coming, and none of them fails; a broken promoted model is counted and the old one serves on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.workers.service.world import API_KEY, INDEX

H = {"X-API-Key": API_KEY}


def _artifact(out, world, seed: int):
    from rerank.model.artifact import EncoderRef, save_artifact
    from rerank.model.ranker import RankerConfig, build_ranker
    from rerank.model.inputs import FeatureSpec

    spec = FeatureSpec(history_k=6)
    cfg = RankerConfig(text_dim=world.text.dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                       hash_buckets=spec.hash_buckets, history_k=spec.history_k, d_model=16, hidden=32, heads=2)
    return save_artifact(out, build_ranker(cfg, device="cpu", seed=seed), feature_spec=spec,
                         text_encoder=EncoderRef(world.text.model_id, world.text.dim), image_encoder=None)


@pytest.fixture()
def registry_state(service_world, tmp_path):
    from rerank.model.artifact import load_artifact
    from rerank.model.registry import ModelRegistry
    from rerank.reranker import Reranker
    from workers.service.state import ServiceState

    w = service_world
    reg = ModelRegistry(tmp_path / "data" / "models")
    a = reg.add(_artifact(tmp_path / "a", w, seed=1))
    b = reg.add(_artifact(tmp_path / "b", w, seed=2))
    assert a != b
    reg.promote(a, reason="first")
    loads: list[str] = []

    def loader(settings):  # what Reranker.from_settings does, over the test world's engine (one local engine per folder)
        loads.append(str(settings.model_dir))
        time.sleep(0.3)  # a load takes time: requests arrive meanwhile
        art = load_artifact(settings.effective_model_dir, mapping=w.engine.get_mapping(INDEX), device="cpu")
        return Reranker(w.engine, INDEX, art, text_encoder=w.text, budget_ms=10_000)

    settings = w.settings(data_dir=tmp_path / "data")
    st = ServiceState.loading(settings, loader=loader)
    st.watch_model, st.watch_interval_s = True, 0.0
    st.load()
    return st, reg, a, b, loads


def test_a_promotion_is_followed_with_no_failed_request(registry_state):
    import httpx

    from workers.service.app import create_app

    st, reg, a, b, loads = registry_state
    app = create_app(st)
    assert st.model_version.replace(":", "-") == a and loads == [str(reg.root / a)]  # the link's target, resolved

    async def fire(c, n):
        out = []
        for k in range(n):
            r = await c.post("/search", json={"query": "black shoes" if k % 2 else "red dress", "size": 5}, headers=H)
            out.append((r.status_code, r.json()["fusionrank"]["model_version"] if r.status_code == 200 else r.text))
        return out

    async def main(switch):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fusionrank.test") as c:
            workers = [asyncio.create_task(fire(c, 25)) for _ in range(4)]
            await asyncio.sleep(0.05)
            await asyncio.to_thread(switch)  # promote while the four clients are sending
            first = await asyncio.gather(*workers)
            for _ in range(200):  # the background load finishes; later requests are served by the new model
                if st.model_version.replace(":", "-") != (a if switch == promote_b else b):
                    break
                await asyncio.sleep(0.05)
            last = await fire(c, 4)
            return [x for f in first for x in f], last

    def promote_b():
        reg.promote(b, reason="test")

    served, last = asyncio.run(main(promote_b))
    assert [s for s, _ in served] == [200] * 100, [x for x in served if x[0] != 200][:3]
    assert {v.replace(":", "-") for _, v in last} == {b}
    assert loads[-1] == str(reg.root / b) and len(loads) == 2  # loaded once, not once per request
    assert all(v.replace(":", "-") in (a, b) for _, v in served)

    served, last = asyncio.run(main(lambda: reg.rollback(reason="test")))  # rollback: followed the same way
    assert [s for s, _ in served] == [200] * 100
    assert {v.replace(":", "-") for _, v in last} == {a} and reg.current() == a
    text = st.metrics.render().decode()
    assert "fusionrank_model_reloads_total 2.0" in text


def test_a_broken_promoted_model_is_counted_and_the_old_one_keeps_serving(registry_state):
    from fastapi.testclient import TestClient

    from workers.service.app import create_app

    st, reg, a, b, loads = registry_state
    (reg.root / b / "weights.safetensors").write_bytes(b"not weights")
    reg.promote(b, reason="a broken copy")
    with TestClient(create_app(st)) as c:
        r = c.post("/search", json={"query": "black shoes", "size": 3}, headers=H)
        assert r.status_code == 200
        for _ in range(200):
            if "fusionrank_model_reload_failures_total 1.0" in st.metrics.render().decode():
                break
            time.sleep(0.05)
        for _ in range(3):  # not retried while the link stays where it is
            r = c.post("/search", json={"query": "black shoes", "size": 3}, headers=H)
            assert r.status_code == 200 and r.json()["fusionrank"]["model_version"].replace(":", "-") == a
    assert "fusionrank_model_reload_failures_total 1.0" in st.metrics.render().decode()
    assert len(loads) == 2 and not any(t.name == "fusionrank-model-follow" for t in threading.enumerate())
