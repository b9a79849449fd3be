"""The bulk indexing job: catalog rows -> validated products -> text/image vectors -> documents -> engine.

The unit of work is a *batch*: a row range ``[start, stop)`` of one catalog file. :func:`index_batch`
is what a Celery task calls (tasks pass batch references, never vectors or images) and what the
inline path calls in-process. It is idempotent: the document ``_id`` is the product id and products
whose content hash and model ids are unchanged are skipped, so a redelivered batch does no harm.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from indexing import fields as F
from indexing.engines.base import BulkAction, SearchEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexJob:
    """What to index and with which models; JSON-serializable so it can travel through the broker."""

    catalog: str
    index: str  # alias (or concrete index) to write to
    images_root: str | None = None
    preset: str | None = None  # catalog field-map preset; None = detect from the header
    text_model: str = "minilm"
    text_backend: str = "torch"
    image_model: str = "efficientnet_lite0"
    device: str = "auto"
    batch_size: int = 256
    #: networks (CIDR) image URLs may lead to besides public addresses: a shop's own image host (setting
    #: ``image_url_allow_networks``); everything loopback/private/link-local/metadata outside them is refused
    image_allow_networks: tuple[str, ...] = ()
    #: photo attribute model directory (indexing.photo_attributes; setting attribute_model_dir): with a products-v4
    #: index, each photo's colour, type, gender and usage are predicted and missing catalog values completed from
    #: ``attribute_threshold`` confidence on
    attribute_model: str | None = None
    attribute_threshold: float = 0.8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexJob":
        d = dict(d)
        d["image_allow_networks"] = tuple(d.get("image_allow_networks") or ())
        return cls(**d)

    def url_policy(self):
        from indexing.url_fetch import UrlPolicy

        return UrlPolicy.from_strings(self.image_allow_networks)


@dataclass(frozen=True)
class ItemError:
    row: int | None
    id: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "id": self.id, "reason": self.reason}


@dataclass(frozen=True)
class BatchResult:
    """What one batch did. ``indexed + unchanged + len(errors)`` = rows read in the range."""

    start: int
    stop: int
    indexed: int
    unchanged: int
    errors: tuple[ItemError, ...]
    seconds: float
    encode_seconds: float = 0.0
    #: products indexed *without* their photo because its URL was refused (counted in ``indexed``, not in errors)
    photos_dropped: tuple[ItemError, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"] = [e.to_dict() for e in self.errors]
        d["photos_dropped"] = [e.to_dict() for e in self.photos_dropped]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BatchResult":
        d = dict(d)
        d["errors"] = tuple(ItemError(**e) for e in d["errors"])
        d["photos_dropped"] = tuple(ItemError(**e) for e in d.get("photos_dropped", ()))
        return cls(**d)


@dataclass(frozen=True)
class IndexSummary:
    """The one typed summary every indexing job returns."""

    index: str
    via: str
    rows: int
    indexed: int
    unchanged: int
    failed: int
    errors: tuple[ItemError, ...]
    seconds: float
    batches: int
    reasons: dict[str, int] = field(default_factory=dict)
    #: products indexed without their photo (a refused image URL), with the reason; ``photo_reasons`` counts kinds
    photos_dropped: tuple[ItemError, ...] = ()
    photo_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def docs_per_s(self) -> float:
        return (self.indexed + self.unchanged) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self, *, max_errors: int = 100) -> dict[str, Any]:
        return {
            "index": self.index,
            "via": self.via,
            "rows": self.rows,
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "failure_reasons": self.reasons,
            "errors": [e.to_dict() for e in self.errors[:max_errors]],
            "errors_truncated": max(0, len(self.errors) - max_errors),
            "photos_dropped": len(self.photos_dropped),
            "photo_drop_reasons": self.photo_reasons,
            "photo_errors": [e.to_dict() for e in self.photos_dropped[:max_errors]],
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "docs_per_s": round(self.docs_per_s, 1),
        }


def plan_batches(rows: int, batch_size: int) -> list[tuple[int, int]]:
    """Row ranges covering ``[0, rows)`` in order."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [(s, min(s + batch_size, rows)) for s in range(0, rows, batch_size)]


def reason_kind(reason: str) -> str:
    """The short kind of an error reason (text before the first ':'), for the summary's counts."""
    return reason.split(":", 1)[0].strip()[:80]


def _count_kinds(errors: Iterable[ItemError]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for e in errors:
        k = reason_kind(e.reason)
        reasons[k] = reasons.get(k, 0) + 1
    return dict(sorted(reasons.items(), key=lambda kv: -kv[1]))


def summarize(index: str, via: str, rows: int, results: Iterable[BatchResult], seconds: float) -> IndexSummary:
    results = list(results)
    errors = tuple(e for r in results for e in r.errors)
    dropped = tuple(e for r in results for e in r.photos_dropped)
    return IndexSummary(
        index=index,
        via=via,
        rows=rows,
        indexed=sum(r.indexed for r in results),
        unchanged=sum(r.unchanged for r in results),
        failed=len(errors),
        errors=errors,
        seconds=seconds,
        batches=len(results),
        reasons=_count_kinds(errors),
        photos_dropped=dropped,
        photo_reasons=_count_kinds(dropped),
    )


class Encoders:
    """The text and image encoders of a job, loaded lazily once per process."""

    def __init__(self, text_model: str, text_backend: str, image_model: str, device: str):
        self.text_model, self.text_backend, self.image_model, self.device = text_model, text_backend, image_model, device
        self._text = None
        self._image = None

    @classmethod
    def for_job(cls, job: IndexJob) -> "Encoders":
        return cls(job.text_model, job.text_backend, job.image_model, job.device)

    @property
    def text_info(self):
        """Name, dim and model id of the text encoder, without loading it."""
        from indexing.encoders import text_encoder_info

        return text_encoder_info(self.text_model, backend=self.text_backend)

    @property
    def image_info(self):
        from indexing.encoders import image_encoder_info

        return image_encoder_info(self.image_model)

    @property
    def text(self):
        if self._text is None:
            from indexing.encoders import get_text_encoder

            self._text = get_text_encoder(self.text_model, backend=self.text_backend, device=self.device)
        return self._text

    @property
    def image(self):
        if self._image is None:
            from indexing.encoders import get_image_encoder

            self._image = get_image_encoder(self.image_model, device=self.device)
        return self._image


def _field_map(job: IndexJob):
    from indexing.catalog import preset_field_map

    return preset_field_map(job.preset) if job.preset else None


def index_batch(
    engine: SearchEngine,
    job: IndexJob,
    start: int,
    stop: int,
    *,
    duplicate_rows: Sequence[int] = (),
    encoders: Encoders | None = None,
    now: float | None = None,
) -> BatchResult:
    """Index catalog rows ``[start, stop)`` of ``job`` into ``job.index``; bad rows become errors, the rest is written."""
    import hashlib

    from indexing.catalog import Product, RowError, read_catalog
    from indexing.documents import build_document, content_hash, is_unchanged, product_text
    from indexing.errors import FusionRankError, ImageRefusedError
    from indexing.images import decode_image, fetch_image_bytes
    from indexing.lifecycle import stores_image_colour, stores_photo_attributes

    t0 = time.perf_counter()
    enc = encoders or Encoders.for_job(job)
    root = Path(job.images_root) if job.images_root else None
    policy = job.url_policy()
    errors: list[ItemError] = []
    dropped: list[ItemError] = []
    products: list[Product] = []
    for item in read_catalog(
        job.catalog, field_map=_field_map(job), images_root=root, start=start, stop=stop,
        duplicate_rows=frozenset(duplicate_rows),
    ):
        if isinstance(item, RowError):
            errors.append(ItemError(item.row, item.id, item.reason))
        else:
            products.append(item)

    # content hashes (image bytes included) decide what is unchanged; each image file is read once
    image_bytes: dict[str, bytes] = {}
    hashed: list[tuple[Product, str, bool]] = []
    for p in products:
        digest = None
        if p.image:
            try:
                image_bytes[p.id] = fetch_image_bytes(p.image, root, policy=policy)
            except ImageRefusedError as e:  # permanent and seller-made: the product goes in without its photo
                dropped.append(ItemError(p.row, p.id, f"image refused: {e}"))
                hashed.append((p, content_hash(p, None), False))
                continue
            except FusionRankError as e:
                errors.append(ItemError(p.row, p.id, f"image: {e}"))
                continue
            digest = hashlib.sha256(image_bytes[p.id]).hexdigest()
        hashed.append((p, content_hash(p, digest), digest is not None))

    text_model_id = enc.text_info.model_id
    image_model_id = enc.image_info.model_id
    mapping = engine.get_mapping(job.index)
    with_attributes = stores_photo_attributes(mapping)
    attr_model = attr_model_id = None
    if with_attributes and job.attribute_model:
        from indexing.photo_attributes import load_cached

        attr_model, attr_model_id = load_cached(job.attribute_model, image_model_id)
    existing = engine.get(job.index, [p.id for p, _, _ in hashed],
                          fields=[F.CONTENT_HASH, F.TEXT_MODEL_ID, F.IMAGE_MODEL_ID, F.ATTRIBUTE_MODEL_ID]) if hashed else {}
    todo: list[tuple[Product, str, bool]] = []
    unchanged = 0
    for p, h, has_img in hashed:
        if is_unchanged(existing.get(p.id), h, text_model_id, image_model_id if has_img else None,
                        attr_model_id if has_img else None):
            unchanged += 1
            image_bytes.pop(p.id, None)
        else:
            todo.append((p, h, has_img))

    # images first: an undecodable photo fails its row before any encoding is spent on it
    t_enc = time.perf_counter()
    images: dict[str, Any] = {}
    ready: list[tuple[Product, str, bool]] = []
    for p, h, has_img in todo:
        if has_img:
            try:
                images[p.id] = decode_image(image_bytes.pop(p.id), source=f"image {p.image!r}")
            except FusionRankError as e:
                errors.append(ItemError(p.row, p.id, f"image: {e}"))
                continue
        ready.append((p, h, has_img))
    text_vecs = enc.text.encode([product_text(p) for p, _, _ in ready]) if ready else []
    with_img = [p.id for p, _, has_img in ready if has_img]
    image_vecs: dict[str, Any] = {}
    regions = None
    if with_img:
        from indexing.photo_attributes import image_vectors

        # one forward pass: the image vectors and, for an attribute model that reads them, the feature maps pooled over the product
        vecs, regions = image_vectors(enc.image, [images[i] for i in with_img], attr_model)
        image_vecs = dict(zip(with_img, vecs))
    colours: dict[str, Any] = {}
    if with_img and stores_image_colour(mapping, repr(job.index)):
        from indexing.photo_colour import colour_descriptor

        colours = {i: colour_descriptor(images[i]) for i in with_img}
    predictions: dict[str, Any] = {}
    if with_img and attr_model is not None:
        from indexing.photo_attributes import predict_images

        predictions = dict(zip(with_img, predict_images(attr_model, [images[i] for i in with_img], [image_vecs[i] for i in with_img],
                                                        regions=regions)))
    encode_s = time.perf_counter() - t_enc

    from indexing.photo_attributes import attribute_document_fields

    ts = int(time.time() if now is None else now)
    rows_by_id = {p.id: p.row for p, _, _ in ready}

    def actions() -> Iterator[BulkAction]:
        for (p, h, has_img), tv in zip(ready, text_vecs):
            iv = image_vecs.get(p.id)
            doc = build_document(
                p,
                text_vec=tv,
                image_vec=iv,
                text_model_id=text_model_id,
                image_model_id=image_model_id if iv is not None else None,
                content_hash=h,
                indexed_at=ts,
                image_colour=colours.get(p.id),
                attribute_fields=attribute_document_fields(p.fields, predictions.get(p.id), attr_model_id, job.attribute_threshold)
                if with_attributes else None,
            )
            yield BulkAction.index(p.id, doc)

    summary = engine.bulk(job.index, actions())
    for item in summary.failed:
        errors.append(ItemError(rows_by_id.get(item.id), item.id, f"engine rejected: {item.error or item.status}"))
    result = BatchResult(
        start=start,
        stop=stop,
        indexed=summary.succeeded,
        unchanged=unchanged,
        errors=tuple(errors),
        seconds=time.perf_counter() - t0,
        encode_seconds=encode_s,
        photos_dropped=tuple(dropped),
    )
    log.info("batch [%d, %d): indexed %d, unchanged %d, failed %d", start, stop, result.indexed, unchanged, len(errors))
    return result


ProgressFn = Callable[[BatchResult], None]


def run_batches(
    engine: SearchEngine,
    job: IndexJob,
    batches: Sequence[tuple[int, int]],
    duplicate_rows: Sequence[int],
    *,
    on_batch: ProgressFn | None = None,
    encoders: Encoders | None = None,
) -> list[BatchResult]:
    """The inline path: the same batch function the Celery tasks run, in this process."""
    enc = encoders or Encoders.for_job(job)
    dups = sorted(duplicate_rows)
    out = []
    for s, e in batches:
        r = index_batch(engine, job, s, e, duplicate_rows=[d for d in dups if s <= d < e], encoders=enc)
        out.append(r)
        if on_batch:
            on_batch(r)
    engine.refresh(job.index)
    return out
