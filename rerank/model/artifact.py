"""Model artifacts of the fusion ranker: versioned directories, checked against the index at load time.

An artifact directory holds:

* ``config.json``: ``format_version``, ``artifact_version`` (UTC time + weights hash), the ranker
  architecture (:class:`~rerank.model.ranker.RankerConfig`: strategy, sizes, ablation flags), the feature
  spec (:class:`~rerank.model.inputs.FeatureSpec`), the encoders the inputs come from (model ids and
  dimensions: ``text`` for ``text_vec`` and queries, ``image`` for the raw ``image_vec``), and the
  alignment's metadata (or null when the model was trained without images), and the colour head's
  (:mod:`rerank.model.colour`; null when the catalog had no colours), and the intent bound's (:mod:`rerank.model.intent`:
  the catalog's attribute vocabularies and the bound's settings; null or absent: the model's scores are served unbounded);
* ``weights.safetensors``: the ranker's tensors (``ranker.*``), the alignment's (``alignment.*``), the
  colour head's (``colour.*``) and the intent names' text vectors (``intent.*``);
* ``training_report.json``: what :mod:`rerank.training.ranker` measured (optional);
* ``behaviour.json.gz``: the behaviour statistics (:mod:`rerank.model.behaviour`) of a model whose feature spec has
  ``behaviour``: the training log's debiased clicks per (query, product) and per product (config ``behaviour``: their
  summary). Missing or unreadable, the model serves with the neutral columns (logged), as for queries without history.

``config.json``'s ``serving`` (:mod:`rerank.safe`) says what the artifact serves: ``{"policy": "model"}`` when training
showed the model beats every first-stage signal on its validation queries, else ``{"policy": "safe_choice", "signal":
...}`` (that signal's order), with the ``verdict`` that decided it. An artifact without the block serves its model.

:func:`load_artifact` refuses (``ModelArtifactError`` naming both sides) an artifact whose encoder
dimensions disagree with the index mapping's ``knn_vector`` dimensions, whose colour head reads a field the
index does not have (``image_colour`` before products-v3), or whose encoder model ids disagree with the ones
given (the index's documents or the configured encoders).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from indexing import fields as F
from indexing.errors import ModelArtifactError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
REPORT_FILE = "training_report.json"
BEHAVIOUR_FILE = "behaviour.json.gz"  # rerank.model.behaviour.BEHAVIOUR_FILE (not imported here: the module loads it lazily)


@dataclass(frozen=True)
class EncoderRef:
    """Which encoder produced an input: its ``model_id`` and dimension."""

    model_id: str
    dim: int

    @classmethod
    def of(cls, info: Any) -> "EncoderRef":
        return cls(str(info.model_id), int(info.dim))

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "dim": self.dim}


@dataclass(frozen=True)
class ModelArtifact:
    path: Path
    ranker: Any  # rerank.model.ranker.FusionRanker (eval mode)
    feature_spec: Any  # rerank.model.inputs.FeatureSpec
    alignment: Any | None  # rerank.model.alignment.Alignment
    text_encoder: EncoderRef
    image_encoder: EncoderRef | None
    config: Mapping[str, Any]
    report: Mapping[str, Any]
    colour: Any | None = None  # rerank.model.colour.ColourModel
    intent: Any | None = None  # rerank.model.intent.IntentModel: the query-intent bound on the model's scores (None: no bound)
    behaviour: Any | None = None  # rerank.model.behaviour.BehaviourStats (None: neutral behaviour columns, or none read)

    @property
    def version(self) -> str:
        return str(self.config.get("artifact_version", ""))

    @property
    def serving(self) -> dict[str, Any]:
        """What this artifact serves (:func:`rerank.safe.serving_of` of ``config.json``'s ``serving``): ``policy`` ``model``
        or ``safe_choice`` (the first-stage ``signal``'s order, when training could not show the model beats it)."""
        from rerank.safe import serving_of

        return serving_of(self.config)

    @property
    def serves_safe_choice(self) -> bool:
        from rerank.safe import SAFE_CHOICE

        return self.serving["policy"] == SAFE_CHOICE


def save_artifact(
    out_dir: str | Path,
    ranker: Any,
    *,
    feature_spec: Any,
    text_encoder: EncoderRef,
    image_encoder: EncoderRef | None,
    alignment: Any | None = None,
    colour: Any | None = None,
    intent: Any | None = None,
    report: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    behaviour: Any | None = None,
) -> Path:
    """Write the artifact into ``out_dir`` (written to a temporary sibling, then renamed into place).

    An existing ``out_dir`` is replaced only when it is itself an artifact (has ``config.json``) or empty."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise ModelArtifactError(f"{out} exists and is not a model artifact; refusing to overwrite it")
    tensors = {f"ranker.{k}": v.detach().cpu().contiguous() for k, v in ranker.state_dict().items()}
    if alignment is not None:
        tensors.update({f"alignment.{k}": v.detach().cpu().contiguous() for k, v in alignment.head.state_dict().items()})
    if colour is not None:
        import torch

        tensors.update({f"colour.{k}": torch.from_numpy(v.copy()).contiguous() for k, v in colour.tensors().items()})
    if intent is not None:
        import torch

        tensors.update({f"intent.{k}": torch.from_numpy(np.ascontiguousarray(v)).contiguous() for k, v in intent.tensors().items()})
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    digest = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
    config = {
        "format_version": FORMAT_VERSION,
        "artifact_version": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{digest}",
        "kind": "fusion_ranker",
        "ranker": ranker.config.to_dict(),
        "features": feature_spec.to_dict(),
        "encoders": {"text": text_encoder.to_dict(), "image": image_encoder.to_dict() if image_encoder else None},
        "alignment": alignment.meta() if alignment is not None else None,
        "colour": colour.meta() if colour is not None else None,
        "intent": intent.meta() if intent is not None else None,
        **({"behaviour": {"file": BEHAVIOUR_FILE, **{k: v for k, v in behaviour.info.items() if k != "theta"}}} if behaviour is not None else {}),
        **dict(extra or {}),
    }
    if behaviour is not None:
        behaviour.save(tmp / BEHAVIOUR_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    if report is not None:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    log.info("saved fusion ranker artifact %s (%s)", out, config["artifact_version"])
    return out


def check_compatible(
    config: Mapping[str, Any],
    *,
    where: str,
    mapping: Mapping[str, Any] | None = None,
    text_model_id: str | None = None,
    image_model_id: str | None = None,
) -> None:
    """Raise :class:`ModelArtifactError` when the artifact's encoders disagree with the index/encoders."""
    from mappings import properties, vector_dims

    enc = config.get("encoders") or {}
    text, image = enc.get("text") or {}, enc.get("image")
    if mapping is not None:
        dims = vector_dims(dict(mapping))
        if F.TEXT_VEC in dims and int(text.get("dim", -1)) != dims[F.TEXT_VEC]:
            raise ModelArtifactError(
                f"model artifact {where} was trained on {F.TEXT_VEC} of dimension {text.get('dim')} ({text.get('model_id')}), "
                f"but the index mapping has {F.TEXT_VEC} dimension {dims[F.TEXT_VEC]}"
            )
        if image and config.get("alignment") and F.IMAGE_VEC in dims and int(image.get("dim", -1)) != dims[F.IMAGE_VEC]:
            raise ModelArtifactError(
                f"model artifact {where} was trained on {F.IMAGE_VEC} of dimension {image.get('dim')} ({image.get('model_id')}), "
                f"but the index mapping has {F.IMAGE_VEC} dimension {dims[F.IMAGE_VEC]}"
            )
        props = properties(dict(mapping))
        for field, dim in ((config.get("colour") or {}).get("inputs") or []):
            if field in (F.TEXT_VEC, F.IMAGE_VEC):
                continue
            have = props.get(field)
            if have is None:
                raise ModelArtifactError(
                    f"model artifact {where} has a colour head that reads {field!r}, but the index has no such field (it was created "
                    f"from a mapping before products-v3): reindex into products-v3 (fusionrank reindex start --mapping products-v3) "
                    f"or retrain the model on this index"
                )
            if int(have.get("dimension", -1)) != int(dim):
                raise ModelArtifactError(f"model artifact {where} reads {field!r} of dimension {dim}, but the index mapping has dimension {have.get('dimension')}")
    if text_model_id is not None and text.get("model_id") != text_model_id:
        raise ModelArtifactError(f"model artifact {where} needs text encoder {text.get('model_id')!r}, but the index/encoder is {text_model_id!r}")
    if image_model_id is not None and image and config.get("alignment") and image.get("model_id") != image_model_id:
        raise ModelArtifactError(f"model artifact {where} needs image encoder {image.get('model_id')!r}, but the index/encoder is {image_model_id!r}")


def read_config(path: str | Path) -> dict[str, Any]:
    d = Path(path)
    f = d / CONFIG_FILE
    if not f.is_file():
        raise ModelArtifactError(f"{d} is not a model artifact: no {CONFIG_FILE}")
    try:
        config = json.loads(f.read_text())
    except ValueError as e:
        raise ModelArtifactError(f"{f} is not valid JSON: {e}") from None
    if config.get("format_version") != FORMAT_VERSION or config.get("kind") != "fusion_ranker":
        raise ModelArtifactError(f"{d}: artifact format {config.get('kind')!r} v{config.get('format_version')!r}; this version reads fusion_ranker v{FORMAT_VERSION}")
    return config


def load_artifact(
    path: str | Path,
    *,
    mapping: Mapping[str, Any] | None = None,
    text_model_id: str | None = None,
    image_model_id: str | None = None,
    device: str = "auto",
) -> ModelArtifact:
    """Load an artifact; check it against the index ``mapping`` (``engine.get_mapping(index)``) and the
    encoder model ids when given; the ranker is returned in eval mode on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from indexing.encoders import resolve_device
    from rerank.model.alignment import Alignment
    from rerank.model.ranker import FusionRanker, RankerConfig
    from rerank.model.inputs import FeatureSpec

    d = Path(path)
    config = read_config(d)
    check_compatible(config, where=str(d), mapping=mapping, text_model_id=text_model_id, image_model_id=image_model_id)
    try:
        tensors = load_file(str(d / WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise ModelArtifactError(f"{d}: cannot read {WEIGHTS_FILE}: {e}") from None
    rcfg, spec = RankerConfig.from_dict(config["ranker"]), FeatureSpec.from_dict(config["features"])
    if rcfg.first_stage_dim != spec.first_stage_dim:
        raise ModelArtifactError(
            f"{d}: the ranker takes {rcfg.first_stage_dim} first-stage inputs, but its feature spec {spec.to_dict()} gives "
            f"{spec.first_stage_dim} with this version of the code (an artifact of another feature layout): retrain it"
        )
    ranker = FusionRanker(rcfg)
    state = {k[len("ranker.") :]: v for k, v in tensors.items() if k.startswith("ranker.")}
    try:
        ranker.load_state_dict(state)
    except RuntimeError as e:
        raise ModelArtifactError(f"{d}: ranker weights do not fit its config: {e}") from None
    alignment = None
    if config.get("alignment"):
        a_state = {k[len("alignment.") :]: v for k, v in tensors.items() if k.startswith("alignment.")}
        alignment = Alignment.from_meta(config["alignment"], a_state)
    colour = None
    if config.get("colour"):
        from rerank.model.colour import ColourModel

        colour = ColourModel.from_meta(config["colour"], {k[len("colour.") :]: v for k, v in tensors.items() if k.startswith("colour.")})
    intent = None
    if config.get("intent"):
        from rerank.model.intent import IntentModel

        intent = IntentModel.from_meta(config["intent"], {k[len("intent.") :]: v for k, v in tensors.items() if k.startswith("intent.")})
        if intent.attributes and intent.text_dim != int(config["encoders"]["text"]["dim"]):
            raise ModelArtifactError(f"{d}: the intent names' vectors have dimension {intent.text_dim}, the text encoder {config['encoders']['text']['dim']}")
    if spec.attributes and intent is None:
        raise ModelArtifactError(f"{d}: its feature spec has attribute agreement inputs ({', '.join(spec.attributes)}) but the artifact has no intent block to read them with")
    behaviour = None
    if spec.behaviour:
        from rerank.model.behaviour import BehaviourStats

        try:
            behaviour = BehaviourStats.load(d / BEHAVIOUR_FILE)
        except ModelArtifactError as e:  # fail open: the model reads the neutral columns, as for a query without history
            log.warning("%s: %s; serving with neutral behaviour features", d, e)
    ranker = ranker.to(resolve_device(device)).eval()
    enc = config["encoders"]
    report = json.loads((d / REPORT_FILE).read_text()) if (d / REPORT_FILE).is_file() else {}
    return ModelArtifact(
        d,
        ranker,
        spec,
        alignment,
        EncoderRef(enc["text"]["model_id"], int(enc["text"]["dim"])),
        EncoderRef(enc["image"]["model_id"], int(enc["image"]["dim"])) if enc.get("image") else None,
        config,
        report,
        colour,
        intent,
        behaviour,
    )


__all__ = ["EncoderRef", "FORMAT_VERSION", "ModelArtifact", "check_compatible", "load_artifact", "read_config", "save_artifact"]
