"""A small real world for the HTTP service tests: LocalEngine + a dozen products indexed with the real MiniLM
text encoder, a real (untrained) FusionRanker artifact saved and loaded through ``rerank.model.artifact``, a SQLite
history store with a few (simulated) events, and product photos (drawn PNGs) under ``images_root``.

``build_world(tmp_dir) -> World``; ``World.state(**settings) -> ServiceState`` (ready, auth on with the keys
below); ``World.app(**settings)`` the FastAPI app. The pytest fixture ``service_world`` (module scope) is
defined here and re-exported by ``tests/workers/service/conftest.py``; other test folders can import it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

INDEX = "products"
IMAGE_DIM = 8
API_KEY = "test-api-key-0123456789"
ADMIN_KEY = "test-admin-key-9876543210"
#: (id, title, article type, colour, gender, price)
PRODUCTS = [
    ("p0", "black running shoes for men", "Shoes", "Black", "Men", 60.0),
    ("p1", "red summer dress", "Dresses", "Red", "Women", 35.0),
    ("p2", "blue denim jeans", "Jeans", "Blue", "Men", 45.0),
    ("p3", "white cotton t-shirt", "Tshirts", "White", "Unisex", 12.0),
    ("p4", "black leather handbag", "Handbags", "Black", "Women", 80.0),
    ("p5", "brown leather belt", "Belts", "Brown", "Men", 20.0),
    ("p6", "green hiking backpack", "Backpacks", "Green", "Unisex", 55.0),
    ("p7", "black sports socks", "Socks", "Black", "Unisex", 8.0),
    ("p8", "grey wool sweater", "Sweaters", "Grey", "Men", 40.0),
    ("p9", "navy blue casual shirt", "Shirts", "Navy Blue", "Men", 30.0),
    ("p10", "black leather shoes formal", "Shoes", "Black", "Men", 90.0),
    ("p11", "white sneakers casual shoes", "Shoes", "White", "Women", 50.0),
]
#: the (simulated) history of user u1: (product, event, hours ago)
U1_EVENTS = [("p0", "purchase", 1), ("p7", "click", 2), ("p4", "view", 3)]


@dataclass
class World:
    dir: Path
    engine: Any
    index: str
    text: Any
    artifact: Any
    store: Any
    profiles: Any
    reranker: Any
    images_root: Path
    sql_url: str

    def settings(self, **overrides: Any):
        from workers.settings import load_settings

        base = dict(api_key=API_KEY, admin_api_key=ADMIN_KEY, data_dir=self.dir / "data", sql_url=self.sql_url,
                    index_alias=self.index, rerank_budget_ms=10_000.0)
        base.update(overrides)
        return load_settings(**base)

    def state(self, *, auth: bool = True, reranker: Any = None, **settings: Any):
        from workers.service.state import ServiceState

        return ServiceState.from_reranker(self.settings(**settings), reranker or self.reranker, auth=auth, images_root=self.images_root)

    def app(self, *, auth: bool = True, **settings: Any):
        from workers.service.app import create_app

        return create_app(self.state(auth=auth, **settings))


def build_world(tmp_dir: Path | str) -> World:
    from PIL import Image

    from indexing import fields as F
    from indexing.encoders import get_text_encoder
    from indexing.engines import create_engine
    from indexing.engines.base import BulkAction
    from mappings import load_mapping
    from rerank.history import EngineVectorSource, HistoryStore, ProfileService
    from rerank.history.store import upgrade
    from rerank.reranker import Reranker

    d = Path(tmp_dir)
    images = d / "images"
    images.mkdir(parents=True, exist_ok=True)
    text = get_text_encoder("minilm")
    engine = create_engine("local", path=d / "engine")
    engine.create_index(INDEX, load_mapping("products-v1", text_dim=text.dim, image_dim=IMAGE_DIM))
    vecs = text.encode([p[1] for p in PRODUCTS])
    actions = []
    for i, (pid, title, art, colour, gender, price) in enumerate(PRODUCTS):
        Image.new("RGB", (16, 16), (20 * i % 256, 100, 200)).save(images / f"{pid}.png")
        actions.append(BulkAction.index(pid, {
            F.ID: pid, F.TITLE: title, F.ARTICLE_TYPE: art, F.COLOUR: colour, F.GENDER: gender, F.PRICE: price,
            F.IMAGE: f"images/{pid}.png", F.HAS_IMAGE: True, F.TEXT_VEC: vecs[i].tolist(),
        }))
    assert engine.bulk(INDEX, actions).ok
    engine.refresh(INDEX)

    art = untrained_artifact(d / "model", engine, INDEX, text)

    url = f"sqlite:///{d / 'history.sqlite3'}"
    upgrade(url)
    store = HistoryStore(url)
    now = datetime.now(timezone.utc)
    store.insert_events([
        {"event_id": f"e{i}", "user_id": "u1", "product_id": p, "type": ev, "ts": now - timedelta(hours=h)}
        for i, (p, ev, h) in enumerate(U1_EVENTS)
    ])
    profiles = ProfileService(store, EngineVectorSource(engine, INDEX), ttl_s=600)  # cached: /events must invalidate
    reranker = Reranker(engine, INDEX, art, text_encoder=text, history=profiles, budget_ms=10_000)
    return World(d, engine, INDEX, text, art, store, profiles, reranker, d, url)


@pytest.fixture(scope="module")
def service_world(tmp_path_factory) -> World:
    w = build_world(tmp_path_factory.mktemp("service-world"))
    yield w
    w.store.close()


def untrained_artifact(out, engine, index, text):
    """A small real (untrained, seeded) FusionRanker artifact, saved and loaded back against ``index``."""
    from rerank.model.artifact import EncoderRef, load_artifact, save_artifact
    from rerank.model.ranker import RankerConfig, build_ranker
    from rerank.model.inputs import FeatureSpec

    spec = FeatureSpec(history_k=6)
    cfg = RankerConfig(text_dim=text.dim, first_stage_dim=spec.first_stage_dim, n_cat_fields=len(spec.cat_fields),
                       hash_buckets=spec.hash_buckets, history_k=spec.history_k, d_model=16, hidden=32, heads=2)
    path = save_artifact(out, build_ranker(cfg, device="cpu", seed=0), feature_spec=spec,
                         text_encoder=EncoderRef(text.model_id, text.dim), image_encoder=None)
    return load_artifact(path, mapping=engine.get_mapping(index), device="cpu")
