"""Admin reindex steps: a new index generation behind an alias, filled from the current one, verified, swapped.

The job, step by step (each step is idempotent, so a job that died anywhere is resumed by running the
remaining steps again; the job record says which source ids the finished batches covered):

1. **create** the target generation ``<alias>-<timestamp>`` from a mapping file, with the dimensions of
   the (new) encoders (an existing target is checked, not recreated);
2. **fill** it from the *source* generation (the concrete index the alias pointed at when the job
   started), in batches of source documents in ascending product id order
   (:meth:`~indexing.engines.base.SearchEngine.iter_documents_by_id`). Each finished batch records the id range
   it covered, ``(after, last]``, and a resumed fill reads the source again strictly after the last id of the
   covered prefix, skipping any other covered range (:class:`FillCoverage`). Batch *numbers* are no resume key:
   they name positions in an iteration order, and OpenSearch's scroll order (``_doc``) changes when segments
   merge, with no document written (seen on a 2.19.1 node, ``tests/contract/test_reindex_live.py``). A document whose
   text / image model ids equal the new encoders' is copied with its stored vectors (no encoding); where
   a model changed, the text is rebuilt from the stored fields (:func:`product_from_document` +
   :func:`indexing.documents.product_text`, the same text the indexing job embeds) and the image is read
   again from ``images_root`` + the document's ``image`` reference. A target whose mapping has the photo
   colour descriptor ``image_colour`` (products-v3) gets it from the re-read photo as well (for a copied
   photo without one too); a field the target's mapping lacks is not carried over (a v3 document copied
   into a v1 generation loses ``image_colour``). A document that is already in the
   target with the same content hash and model ids is skipped, so a redelivered batch does no harm;
3. **verify**: the target's count equals the source's, a sample of source ids is in the target with the
   same content hash, and smoke queries (BM25 on sampled source titles, kNN with a sampled stored vector)
   return results. A failure raises :class:`VerificationError` and the alias is not touched;
4. **swap** the alias from source to target in one atomic engine call (OpenSearch: one ``_aliases``
   request with ``remove`` + ``add``). The source generation is kept (rollback goes back to it).

Readers keep searching through the alias the whole time: the alias points at the complete source until
the swap, and at the complete, verified target after it.

Nothing here needs SQL: progress goes to a :class:`JobRecord` (the workers keep it in the SQL store), and
a ``checkpoint(step)`` callback is called at each step boundary (tests use it to inject faults).
"""

from __future__ import annotations

import bisect
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from indexing import fields as F
from indexing.engines.base import BulkAction, SearchEngine
from indexing.errors import ConfigError, EngineError, FusionRankError, IndexNotFoundError, MappingError
from indexing.lifecycle import check_dims, is_generation_of, load_body, stores_image_colour, stores_photo_attributes
from indexing.photo_colour import colour_descriptor
from mappings import properties

log = logging.getLogger(__name__)

#: the steps of a job, in order (the job record's ``step``)
STEPS = ("create", "fill", "verify", "swap", "done")

#: checkpoint names the job calls (fault-injection points for tests): after creating the target; after
#: each fill batch is written and recorded ("fill:<n>"); after the fill; between the verify checks; right
#: before the swap request; after it.
Checkpoint = Callable[[str], None]


class ReindexError(FusionRankError):
    """A reindex job cannot go on (bad state, conflicting alias change, nothing to roll back to)."""


class VerificationError(ReindexError):
    """The new generation failed verification; the alias was not swapped."""


def _no_checkpoint(step: str) -> None:
    return None


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ReindexPlan:
    """Everything a job (or one of its batches, on a worker) needs; JSON-serializable for the broker."""

    job_id: str
    alias: str
    source: str
    target: str
    mapping: str
    text_model: str
    text_backend: str
    image_model: str
    images_root: str | None = None
    device: str = "auto"
    batch_size: int = 256
    hnsw_engine: str | None = None
    #: networks image URLs may lead to besides public addresses (see :class:`indexing.pipeline.IndexJob`)
    image_allow_networks: tuple[str, ...] = ()
    #: photo attribute model directory and completion threshold (see :class:`indexing.pipeline.IndexJob`); used
    #: when the target's mapping has the photo attribute fields (products-v4)
    attribute_model: str | None = None
    attribute_threshold: float = 0.8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReindexPlan":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["image_allow_networks"] = tuple(kw.get("image_allow_networks") or ())
        return cls(**kw)


@dataclass(frozen=True)
class FillBatchResult:
    """What one fill batch did: ``copied`` (vectors reused) + ``reencoded`` + ``unchanged`` (already in the
    target) + ``failed`` = documents in the batch. ``errors`` are ``(id, reason)``."""

    batch: int
    start: int
    stop: int
    copied: int
    reencoded: int
    unchanged: int
    failed: int
    seconds: float
    errors: tuple[tuple[str, str], ...] = ()
    #: the source ids the batch covered: those in ``(after, last]`` in product id order (``after`` None: from the
    #: first id); ``last`` None: a result from before id-ordered fills, which says nothing about the ids it covered
    after: str | None = None
    last: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"] = [list(e) for e in self.errors]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FillBatchResult":
        d = dict(d)
        d["errors"] = tuple(tuple(e) for e in d.get("errors", ()))
        return cls(**d)


@dataclass(frozen=True)
class VerifyReport:
    source_count: int
    target_count: int
    sampled_ids: int
    smoke_queries: int
    smoke_with_results: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    index: str
    count: int | None
    current: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FillCoverage:
    """The source ids that finished fill batches covered: disjoint, sorted ranges ``(after, last]`` of product ids
    (``after`` None: from the first id), each with the number of documents its batches held, plus the number of
    batches added. JSON-serializable (:meth:`to_dict`) for a job record. Ids compare as Python ``str``, the order
    :meth:`~indexing.engines.base.SearchEngine.iter_documents_by_id` reads them in."""

    ranges: list[tuple[str | None, str, int]] = field(default_factory=list)
    batches: int = 0

    def add(self, after: str | None, last: str, docs: int) -> None:
        """Record that the ids in ``(after, last]`` are finished (overlapping or touching ranges are merged)."""
        if after is not None and after >= last:
            raise ReindexError(f"empty fill range ({after!r}, {last!r}]")
        rs = sorted([*self.ranges, (after, last, int(docs))], key=lambda r: (r[0] is not None, r[0] or ""))
        merged: list[tuple[str | None, str, int]] = []
        for a, b, n in rs:
            if merged and (a is None or a <= merged[-1][1]):
                pa, pb, pn = merged[-1]
                merged[-1] = (pa, max(pb, b), pn + n)
            else:
                merged.append((a, b, n))
        self.ranges = merged
        self.batches += 1
        self.__dict__.pop("_lasts", None)

    def head(self) -> tuple[str | None, int]:
        """``(cursor, documents)``: the last id of the covered prefix (the range from the first id on) and the
        documents it holds; ``(None, 0)`` when the first batch is not finished."""
        if self.ranges and self.ranges[0][0] is None:
            return self.ranges[0][1], self.ranges[0][2]
        return None, 0

    def covers(self, pid: str) -> bool:
        lasts = self.__dict__.get("_lasts")
        if lasts is None:
            lasts = self.__dict__["_lasts"] = [r[1] for r in self.ranges]
        i = bisect.bisect_left(lasts, pid)
        if i == len(lasts):
            return False
        a = self.ranges[i][0]
        return a is None or a < pid

    def to_dict(self) -> dict[str, Any]:
        return {"order": "product_id", "ranges": [list(r) for r in self.ranges], "batches": self.batches}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FillCoverage":
        if not d:
            return cls()
        if d.get("order") != "product_id":
            raise ReindexError(f"the job record's fill coverage is in an unknown order {d.get('order')!r}")
        return cls([(a, str(b), int(n)) for a, b, n in d.get("ranges", ())], int(d.get("batches", 0)))


class JobRecord(Protocol):
    """Where a job keeps its progress (the workers implement it on the SQL store)."""

    def finished_batches(self) -> set[int]: ...
    def coverage(self) -> FillCoverage:
        """The id ranges of the finished batches (those recorded with one: ``result.last`` set)."""
        ...
    def batch_done(self, result: FillBatchResult) -> None:
        """Record a finished batch and, with ``result.last`` set, add its id range to the coverage."""
        ...
    def set_step(self, step: str, **details: Any) -> None: ...


@dataclass
class MemoryRecord:
    """A :class:`JobRecord` in memory: for library callers and tests that need no persistence."""

    step: str = "create"
    batches: dict[int, FillBatchResult] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    covered: FillCoverage = field(default_factory=FillCoverage)

    def finished_batches(self) -> set[int]:
        return set(self.batches)

    def coverage(self) -> FillCoverage:
        return FillCoverage(list(self.covered.ranges), self.covered.batches)

    def batch_done(self, result: FillBatchResult) -> None:
        if result.batch in self.batches:
            return  # a second record of the same batch (as the SQL store ignores it)
        self.batches[result.batch] = result
        if result.last is not None:
            self.covered.add(result.after, result.last, result.stop - result.start)

    def set_step(self, step: str, **details: Any) -> None:
        self.step = step
        self.details.update(details)


# --------------------------------------------------------------------------- encoders of a plan
def plan_encoders(plan: ReindexPlan):
    """The plan's encoders (loaded lazily: only a batch that re-encodes loads a model)."""
    from indexing.pipeline import Encoders

    return Encoders(plan.text_model, plan.text_backend, plan.image_model, plan.device)


# --------------------------------------------------------------------------- step 1: create
def current_generation(engine: SearchEngine, alias: str) -> str:
    """The concrete index the alias points at (ReindexError when it points nowhere)."""
    try:
        targets = engine.get_alias(alias)
    except IndexNotFoundError:
        targets = []
    if len(targets) != 1:
        raise ReindexError(
            f"alias {alias!r} points at {targets or 'nothing'}; a reindex needs exactly one source generation "
            "(index a catalog first: fusionrank index --catalog ...)"
        )
    return targets[0]


def create_target(engine: SearchEngine, plan: ReindexPlan, encoders=None) -> None:
    """Create the target generation from ``plan.mapping`` with the encoders' dimensions (idempotent)."""
    enc = encoders or plan_encoders(plan)
    tdim, idim = enc.text_info.dim, enc.image_info.dim
    if not is_generation_of(plan.target, plan.alias):
        raise ConfigError(f"target {plan.target!r} is not a generation name of alias {plan.alias!r}")
    if engine.index_exists(plan.target):
        check_dims(plan.target, engine.get_mapping(plan.target), text_dim=tdim, image_dim=idim)
        log.info("target generation %s exists already (resuming)", plan.target)
        return
    body = load_body(plan.mapping, text_dim=tdim, image_dim=idim, hnsw_engine=plan.hnsw_engine)
    engine.create_index(plan.target, body)
    log.info("created generation %s from mapping %s (text dim %d, image dim %d)", plan.target, plan.mapping, tdim, idim)


# --------------------------------------------------------------------------- step 2: fill
def product_from_document(doc: Mapping[str, Any]):
    """The catalog :class:`~indexing.catalog.Product` a stored document was built from (fields, image ref)."""
    from indexing.catalog import Product
    from indexing.documents import DOC_FIELDS

    pid = doc.get(F.ID)
    if not pid:
        raise ReindexError("stored document has no product id")
    return Product(id=str(pid), row=-1, fields={k: doc[k] for k in DOC_FIELDS if doc.get(k) is not None}, image=doc.get(F.IMAGE))


class SourceBatch(NamedTuple):
    """A batch of source documents: its number, the ordinal of its first document in product id order, the
    id before its first one (None: none), and the documents. It covers the ids in ``(after, last id]``."""

    batch: int
    start: int
    after: str | None
    docs: list[dict[str, Any]]

    @property
    def last(self) -> str:
        return str(self.docs[-1][F.ID])


def iter_source_batches(
    engine: SearchEngine, source: str, batch_size: int, *, coverage: FillCoverage | None = None, first_batch: int = 0,
) -> Iterator[SourceBatch]:
    """The batches of the source's documents that ``coverage`` does not cover, in ascending product id order,
    numbered from ``first_batch``: the source is read strictly after the covered prefix's last id, documents in
    another covered range are skipped, and a batch never spans one (so each batch is one id range)."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    cov = coverage or FillCoverage()
    prev, ordinal = cov.head()
    n = first_batch
    buf: list[dict[str, Any]] = []
    after: str | None = prev
    start = ordinal
    for doc in engine.iter_documents_by_id(source, after=prev, batch_size=min(batch_size, 10_000)):
        pid = str(doc[F.ID])
        if prev is not None and pid <= prev:  # the engine broke its order: a cursor would skip documents
            raise ReindexError(f"source {source!r} returned product id {pid!r} after {prev!r}; not in product id order")
        if cov.covers(pid):
            if buf:
                yield SourceBatch(n, start, after, buf)
                n, buf = n + 1, []
        else:
            if not buf:
                after, start = prev, ordinal
            buf.append(doc)
            if len(buf) == batch_size:
                yield SourceBatch(n, start, after, buf)
                n, buf = n + 1, []
        prev, ordinal = pid, ordinal + 1
    if buf:
        yield SourceBatch(n, start, after, buf)


def fill_batch(
    engine: SearchEngine,
    plan: ReindexPlan,
    batch: int,
    start: int,
    docs: Sequence[Mapping[str, Any]],
    *,
    encoders=None,
    now: float | None = None,
    after: str | None = None,
) -> FillBatchResult:
    """Write one batch of source documents into the target: copy vectors where the model ids are unchanged,
    re-encode where they changed; skip documents the target has already (same hash and model ids). ``docs`` are
    in product id order; the result covers ``(after, last id of docs]``."""
    from indexing.documents import is_unchanged

    t0 = time.perf_counter()
    enc = encoders or plan_encoders(plan)
    text_id, image_id = enc.text_info.model_id, enc.image_info.model_id
    ids = [str(d[F.ID]) for d in docs]
    existing = engine.get(plan.target, ids, fields=[F.CONTENT_HASH, F.TEXT_MODEL_ID, F.IMAGE_MODEL_ID, F.ATTRIBUTE_MODEL_ID])
    target_mapping = engine.get_mapping(plan.target)
    target_fields = set(properties(target_mapping))
    with_colour = stores_image_colour(target_mapping, f"target {plan.target!r}")
    with_attrs = stores_photo_attributes(target_mapping)
    attr_model = attr_id = None
    if with_attrs and plan.attribute_model:
        from indexing.photo_attributes import load_cached

        attr_model, attr_id = load_cached(plan.attribute_model, image_id)
    errors: list[tuple[str, str]] = []
    out: dict[str, dict[str, Any]] = {}
    need_text: list[dict[str, Any]] = []
    need_image: list[dict[str, Any]] = []
    need_colour: list[dict[str, Any]] = []
    unchanged = 0
    for d in docs:
        pid = str(d[F.ID])
        has_img = d.get(F.IMAGE_VEC) is not None
        want_image_id = image_id if has_img else None
        if is_unchanged(existing.get(pid), d.get(F.CONTENT_HASH), text_id, want_image_id, attr_id if has_img else None):
            unchanged += 1
            continue
        doc = {k: v for k, v in d.items() if k in target_fields}  # a field the target's (strict) mapping lacks is not carried over
        out[pid] = doc
        if doc.get(F.TEXT_MODEL_ID) != text_id or doc.get(F.TEXT_VEC) is None:
            need_text.append(doc)
        if has_img and doc.get(F.IMAGE_MODEL_ID) != image_id:
            need_image.append(doc)
        elif has_img and with_colour and doc.get(F.IMAGE_COLOUR) is None:
            need_colour.append(doc)  # same image model, but the source was created before the photo colour descriptor
    reencoded_ids: set[str] = set()
    if need_text:
        from indexing.documents import product_text

        texts, ok_docs = [], []
        for doc in need_text:
            try:
                texts.append(product_text(product_from_document(doc)))
                ok_docs.append(doc)
            except FusionRankError as e:
                errors.append((str(doc[F.ID]), f"text: {e}"))
                out.pop(str(doc[F.ID]), None)
        for doc, vec in zip(ok_docs, enc.text.encode(texts) if texts else []):
            doc[F.TEXT_VEC] = [float(x) for x in vec]
            doc[F.TEXT_MODEL_ID] = text_id
            reencoded_ids.add(str(doc[F.ID]))
    if need_image:
        _reencode_images(plan, enc, [d for d in need_image if str(d[F.ID]) in out], image_id, errors, colour=with_colour)
        reencoded_ids.update(str(d[F.ID]) for d in need_image if str(d[F.ID]) in out)
    if need_colour:
        _add_colour_descriptors(plan, [d for d in need_colour if str(d[F.ID]) in out], errors)
    if with_attrs:
        _fill_attributes(plan, list(out.values()), attr_model, attr_id, errors, enc)
    if reencoded_ids:
        ts = int(time.time() if now is None else now)
        for pid in reencoded_ids:
            out[pid][F.INDEXED_AT] = ts
    summary = engine.bulk(plan.target, (BulkAction.index(pid, doc) for pid, doc in out.items()))
    rejected = {item.id for item in summary.failed}
    for item in summary.failed:
        errors.append((item.id, f"engine rejected: {item.error or item.status}"))
    written = [pid for pid in out if pid not in rejected]
    reenc = sum(1 for pid in written if pid in reencoded_ids)
    failed_ids = {e[0] for e in errors if not e[1].startswith(("image dropped", "image colour skipped", "image attributes skipped"))}
    res = FillBatchResult(
        batch=batch,
        start=start,
        stop=start + len(docs),
        copied=len(written) - reenc,
        reencoded=reenc,
        unchanged=unchanged,
        failed=len(failed_ids),
        seconds=time.perf_counter() - t0,
        errors=tuple(errors),
        after=after,
        last=ids[-1] if ids else None,
    )
    log.info("fill batch %d [%d, %d): copied %d, re-encoded %d, unchanged %d, failed %d",
             batch, res.start, res.stop, res.copied, res.reencoded, unchanged, res.failed)
    return res


def _read_photo(plan: ReindexPlan, doc: Mapping[str, Any]):
    """The decoded photo of a stored document (its ``image`` reference under ``images_root``)."""
    from indexing.images import decode_image, fetch_image_bytes

    ref = doc.get(F.IMAGE)
    if not ref:
        raise ReindexError("the stored document has an image vector but no image reference")
    from indexing.url_fetch import UrlPolicy

    root = Path(plan.images_root) if plan.images_root else None
    policy = UrlPolicy.from_strings(plan.image_allow_networks)
    return decode_image(fetch_image_bytes(ref, root, policy=policy), source=f"image {ref!r}")


def _read_photos(plan: ReindexPlan, docs: list[dict[str, Any]], errors: list, label: str,
                 on_failure: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], list[Any]]:
    """The documents whose photo can be read (:func:`_read_photo`) and their photos; each of the others is recorded
    in ``errors`` as ``label: reason`` and handed to ``on_failure`` (what the product keeps without its photo)."""
    ok, images = [], []
    for doc in docs:
        try:
            images.append(_read_photo(plan, doc))
            ok.append(doc)
        except FusionRankError as e:
            errors.append((str(doc[F.ID]), f"{label}: {e}"))
            if on_failure is not None:
                on_failure(doc)
    return ok, images


def _reencode_images(plan: ReindexPlan, enc, docs: list[dict[str, Any]], image_id: str, errors: list, *, colour: bool = False) -> None:
    """Re-read and re-encode the photos (and, for a target with ``image_colour``, describe their colours); a photo
    that cannot be used any more leaves the product without an image vector (a missing modality, as the indexing
    job does), recorded as ``image dropped: ...``."""
    def drop(doc: dict[str, Any]) -> None:
        for k in (F.IMAGE_VEC, F.IMAGE_MODEL_ID, F.IMAGE_COLOUR):
            doc.pop(k, None)
        doc[F.HAS_IMAGE] = False

    ok, images = _read_photos(plan, docs, errors, "image dropped", drop)
    for doc, im, vec in zip(ok, images, enc.image.encode(images) if images else []):
        doc[F.IMAGE_VEC] = [float(x) for x in vec]
        doc[F.IMAGE_MODEL_ID] = image_id
        if colour:
            doc[F.IMAGE_COLOUR] = [float(x) for x in colour_descriptor(im)]
        else:
            doc.pop(F.IMAGE_COLOUR, None)


def _add_colour_descriptors(plan: ReindexPlan, docs: list[dict[str, Any]], errors: list) -> None:
    """Describe the colours of photos whose image vectors are copied (a source from before products-v3). A photo
    that cannot be read any more keeps its copied vector and goes without a descriptor (``image colour skipped``)."""
    for doc, im in zip(*_read_photos(plan, docs, errors, "image colour skipped")):
        doc[F.IMAGE_COLOUR] = [float(x) for x in colour_descriptor(im)]


def _fill_attributes(plan: ReindexPlan, docs: list[dict[str, Any]], model, model_id: str | None, errors: list, enc=None) -> None:
    """The photo attribute fields of a products-v4 target. Only photos whose stored predictions come from another
    model (or none) are re-read: a document whose ``attribute_model_id`` is the model's keeps its fields as copied.
    A model whose heads read region features runs the image encoder (``enc.image``) over the re-read photos.
    Without a model, the ``effective_*`` fields hold the catalog's values. A photo that cannot be read any more
    leaves the product with catalog values only (``image attributes skipped: ...``)."""
    from indexing.photo_attributes import attribute_document_fields, predict_images

    todo = []
    for doc in docs:
        has_img = doc.get(F.IMAGE_VEC) is not None
        if model is not None and has_img and doc.get(F.ATTRIBUTE_MODEL_ID) == model_id:
            continue  # predicted by this very model already (copied with the document)
        if model is not None and has_img:
            todo.append(doc)
        elif F.COMPLETED_ATTRIBUTES not in doc:
            doc.update(attribute_document_fields(doc, None, None, plan.attribute_threshold))
    ok, images = _read_photos(plan, todo, errors, "image attributes skipped",
                              lambda doc: doc.update(attribute_document_fields(doc, None, None, plan.attribute_threshold)))
    if ok:
        vecs = [np.asarray(d[F.IMAGE_VEC], dtype=np.float32) for d in ok]
        encoder = (enc or plan_encoders(plan)).image if model.needs_regions else None
        for doc, pred in zip(ok, predict_images(model, images, vecs, encoder=encoder)):
            for k in list(doc):  # stale predictions of another model go
                if k.startswith("photo_") or k in (F.COMPLETED_ATTRIBUTES, F.ATTRIBUTE_MODEL_ID) or k in F.EFFECTIVE_FIELDS.values():
                    doc.pop(k)
            doc.update(attribute_document_fields(doc, pred, model_id, plan.attribute_threshold))


def fill(
    engine: SearchEngine,
    plan: ReindexPlan,
    record: JobRecord,
    *,
    encoders=None,
    checkpoint: Checkpoint = _no_checkpoint,
    on_batch: Callable[[FillBatchResult], None] | None = None,
) -> list[FillBatchResult]:
    """Fill the target in this process with the source documents whose ids the record's finished batches did not
    cover (:func:`resume_point`)."""
    enc = encoders or plan_encoders(plan)
    cov, first = resume_point(record)
    out = []
    for b in iter_source_batches(engine, plan.source, plan.batch_size, coverage=cov, first_batch=first):
        r = fill_batch(engine, plan, b.batch, b.start, b.docs, encoders=enc, after=b.after)
        record.batch_done(r)
        out.append(r)
        if on_batch:
            on_batch(r)
        checkpoint(f"fill:{b.batch}")
    engine.refresh(plan.target)
    return out


def resume_point(record: JobRecord) -> tuple[FillCoverage, int]:
    """``(coverage, first new batch number)`` of a job's record. Finished batches recorded without an id range
    (by a version that numbered scroll positions) say nothing about which documents they held: their documents are
    read again (a document already in the target with the same hash and model ids is skipped, nothing re-encoded)."""
    done = record.finished_batches()
    cov = record.coverage()
    if len(done) > cov.batches:
        log.warning("%d finished fill batches were recorded without id ranges (by scroll position, which a segment merge "
                    "changes); their documents are read again and the ones already in the target are skipped",
                    len(done) - cov.batches)
    return cov, (max(done) + 1 if done else 0)


def count_batches(engine: SearchEngine, source: str, batch_size: int) -> tuple[int, int]:
    """(documents, batches) of the source."""
    engine.refresh(source)
    n = engine.count(source)
    return n, -(-n // batch_size)


# --------------------------------------------------------------------------- step 3: verify
def verify(
    engine: SearchEngine,
    plan: ReindexPlan,
    *,
    sample_size: int = 50,
    smoke_queries: int = 5,
    seed: int = 0,
    checkpoint: Checkpoint = _no_checkpoint,
) -> VerifyReport:
    """Check the target against the source; raise :class:`VerificationError` naming what is wrong."""
    engine.refresh(plan.target)
    src_n, dst_n = engine.count(plan.source), engine.count(plan.target)
    if src_n != dst_n:
        raise VerificationError(f"generation {plan.target} holds {dst_n} documents, the source {plan.source} holds {src_n}; not swapping")
    if src_n == 0:
        raise VerificationError(f"source generation {plan.source} is empty; nothing to swap to")
    checkpoint("verify:count")
    # a reservoir sample of source documents (ids + titles + content hashes)
    rng = random.Random(seed)
    sample: list[dict[str, Any]] = []
    for i, doc in enumerate(engine.iter_documents(plan.source, batch_size=1000)):
        item = {F.ID: str(doc[F.ID]), F.TITLE: doc.get(F.TITLE), F.CONTENT_HASH: doc.get(F.CONTENT_HASH)}
        if len(sample) < sample_size:
            sample.append(item)
        else:
            j = rng.randint(0, i)
            if j < sample_size:
                sample[j] = item
    got = engine.get(plan.target, [d[F.ID] for d in sample], fields=[F.CONTENT_HASH, F.TEXT_VEC, F.TEXT_MODEL_ID])
    missing = [d[F.ID] for d in sample if d[F.ID] not in got]
    if missing:
        raise VerificationError(f"generation {plan.target} lacks sampled source ids {missing[:10]}; not swapping")
    differ = [d[F.ID] for d in sample if got[d[F.ID]].get(F.CONTENT_HASH) != d[F.CONTENT_HASH]]
    if differ:
        raise VerificationError(f"generation {plan.target} has other content than the source for ids {differ[:10]}; not swapping")
    checkpoint("verify:sample")
    titled = [d for d in sample if d.get(F.TITLE)][:smoke_queries]
    hits_ok = 0
    for d in titled:
        if engine.bm25_search(plan.target, str(d[F.TITLE]), size=5):
            hits_ok += 1
    vec_doc = next((got[d[F.ID]] for d in sample if got[d[F.ID]].get(F.TEXT_VEC)), None)
    n_queries = len(titled)
    if vec_doc is not None:
        n_queries += 1
        if engine.knn_search(plan.target, F.TEXT_VEC, vec_doc[F.TEXT_VEC], k=5):
            hits_ok += 1
    if hits_ok < n_queries:
        raise VerificationError(f"generation {plan.target}: only {hits_ok} of {n_queries} smoke queries returned results; not swapping")
    checkpoint("verify:smoke")
    return VerifyReport(src_n, dst_n, len(sample), n_queries, hits_ok)


# --------------------------------------------------------------------------- step 4: swap, rollback, cleanup
def swap(engine: SearchEngine, plan: ReindexPlan, *, checkpoint: Checkpoint = _no_checkpoint) -> list[str]:
    """Point the alias at the target in one atomic request; refuses when the alias moved since the job started.

    Idempotent: when the alias points at the target already (the job died after the swap), nothing is sent.
    """
    now = engine.get_alias(plan.alias)
    if now == [plan.target]:
        log.info("alias %s points at %s already", plan.alias, plan.target)
        return [plan.source]
    if now != [plan.source]:
        raise ReindexError(
            f"alias {plan.alias!r} points at {now or 'nothing'}, not at the job's source {plan.source!r}: someone changed it "
            "during the job; start a new job from the current generation"
        )
    checkpoint("swap")
    prev = engine.swap_alias(plan.alias, plan.target)
    checkpoint("swapped")
    log.info("alias %s: %s -> %s", plan.alias, prev, plan.target)
    return prev


def generations(engine: SearchEngine, alias: str, *, counts: bool = True) -> list[Generation]:
    """The alias's generations, oldest first (names sort by their timestamp), with counts and the current one."""
    try:
        current = set(engine.get_alias(alias))
    except IndexNotFoundError:
        current = set()
    out = []
    for name in engine.list_indices(f"{alias}-"):
        if not is_generation_of(name, alias):
            continue
        n = None
        if counts:
            try:
                n = engine.count(name)
            except EngineError as e:
                log.warning("cannot count %s: %s", name, e)
        out.append(Generation(name, n, name in current))
    return out


def rollback(engine: SearchEngine, alias: str, to: str, *, expect_current: str | None = None) -> list[str]:
    """Point ``alias`` back at generation ``to`` atomically (it must exist, be a generation of the alias and hold
    documents); with ``expect_current``, refuse when the alias has moved elsewhere meanwhile."""
    if not is_generation_of(to, alias):
        raise ReindexError(f"{to!r} is not a generation of alias {alias!r}")
    if not engine.index_exists(to):
        raise ReindexError(f"generation {to!r} no longer exists (cleaned up?); nothing to roll back to")
    now = engine.get_alias(alias)
    if now == [to]:
        return now
    if expect_current is not None and now != [expect_current]:
        raise ReindexError(f"alias {alias!r} points at {now or 'nothing'}, expected {expect_current!r}; not rolling back")
    engine.refresh(to)
    if engine.count(to) == 0:
        raise ReindexError(f"generation {to!r} is empty; refusing to point alias {alias!r} at it")
    prev = engine.swap_alias(alias, to)
    log.info("rolled alias %s back: %s -> %s", alias, prev, to)
    return prev


def cleanup(engine: SearchEngine, alias: str, keep: int, *, protect: Sequence[str] = ()) -> list[str]:
    """Delete all but the ``keep`` newest generations; never the one the alias points at, nor ``protect``
    (targets of unfinished jobs). Returns the deleted names."""
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1 (the alias's own generation is always kept), got {keep}")
    gens = [g.index for g in generations(engine, alias, counts=False)]
    current = set(engine.get_alias(alias))
    kept = set(gens[-keep:]) | current | set(protect)
    deleted = []
    for name in gens:
        if name in kept:
            continue
        if set(engine.get_alias(alias)) & {name}:  # re-read: the alias may have moved meanwhile
            continue
        engine.delete_index(name)
        deleted.append(name)
    if deleted:
        log.info("deleted generations %s of alias %s", deleted, alias)
    return deleted


__all__ = [
    "STEPS", "Checkpoint", "ReindexError", "VerificationError", "ReindexPlan", "FillBatchResult", "VerifyReport",
    "Generation", "JobRecord", "MemoryRecord", "FillCoverage", "SourceBatch", "current_generation", "create_target",
    "product_from_document", "iter_source_batches", "fill_batch", "fill", "resume_point", "count_batches", "verify", "swap", "generations", "rollback",
    "cleanup", "plan_encoders", "MappingError",
]
