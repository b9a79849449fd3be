"""Admin reindex steps: a new index generation behind an alias, filled from the current one, verified, swapped.

The job, step by step (each step is idempotent, so a job that died anywhere is resumed by running the
remaining steps again; the job record says which batches are finished):

1. **create** the target generation ``<alias>-<timestamp>`` from a mapping file, with the dimensions of
   the (new) encoders (an existing target is checked, not recreated);
2. **fill** it from the *source* generation (the concrete index the alias pointed at when the job
   started), in batches of source documents in the source's stable iteration order. A document whose
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

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

from indexing import fields as F
from indexing.engines.base import BulkAction, SearchEngine
from indexing.errors import ConfigError, EngineError, FusionRankError, IndexNotFoundError, MappingError
from indexing.lifecycle import check_dims, is_generation_of, load_body, stores_image_colour
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReindexPlan":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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


class JobRecord(Protocol):
    """Where a job keeps its progress (the workers implement it on the SQL store)."""

    def finished_batches(self) -> set[int]: ...
    def batch_done(self, result: FillBatchResult) -> None: ...
    def set_step(self, step: str, **details: Any) -> None: ...


@dataclass
class MemoryRecord:
    """A :class:`JobRecord` in memory: for library callers and tests that need no persistence."""

    step: str = "create"
    batches: dict[int, FillBatchResult] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def finished_batches(self) -> set[int]:
        return set(self.batches)

    def batch_done(self, result: FillBatchResult) -> None:
        self.batches[result.batch] = result

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


def iter_source_batches(engine: SearchEngine, source: str, batch_size: int) -> Iterator[tuple[int, int, list[dict[str, Any]]]]:
    """``(batch number, start ordinal, documents)`` over the source in its stable iteration order."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    buf: list[dict[str, Any]] = []
    n = start = 0
    for doc in engine.iter_documents(source, batch_size=min(batch_size, 10_000)):
        buf.append(doc)
        if len(buf) == batch_size:
            yield n, start, buf
            n, start, buf = n + 1, start + len(buf), []
    if buf:
        yield n, start, buf


def fill_batch(
    engine: SearchEngine,
    plan: ReindexPlan,
    batch: int,
    start: int,
    docs: Sequence[Mapping[str, Any]],
    *,
    encoders=None,
    now: float | None = None,
) -> FillBatchResult:
    """Write one batch of source documents into the target: copy vectors where the model ids are unchanged,
    re-encode where they changed; skip documents the target has already (same hash and model ids)."""
    from indexing.documents import is_unchanged

    t0 = time.perf_counter()
    enc = encoders or plan_encoders(plan)
    text_id, image_id = enc.text_info.model_id, enc.image_info.model_id
    ids = [str(d[F.ID]) for d in docs]
    existing = engine.get(plan.target, ids, fields=[F.CONTENT_HASH, F.TEXT_MODEL_ID, F.IMAGE_MODEL_ID])
    target_mapping = engine.get_mapping(plan.target)
    target_fields = set(properties(target_mapping))
    with_colour = stores_image_colour(target_mapping, f"target {plan.target!r}")
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
        if is_unchanged(existing.get(pid), d.get(F.CONTENT_HASH), text_id, want_image_id):
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
    failed_ids = {e[0] for e in errors if not e[1].startswith(("image dropped", "image colour skipped"))}
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
    return decode_image(fetch_image_bytes(ref, Path(plan.images_root) if plan.images_root else None), source=f"image {ref!r}")


def _reencode_images(plan: ReindexPlan, enc, docs: list[dict[str, Any]], image_id: str, errors: list, *, colour: bool = False) -> None:
    """Re-read and re-encode the photos (and, for a target with ``image_colour``, describe their colours); a photo
    that cannot be used any more leaves the product without an image vector (a missing modality, as the indexing
    job does), recorded as ``image dropped: ...``."""
    images, ok = [], []
    for doc in docs:
        try:
            images.append(_read_photo(plan, doc))
            ok.append(doc)
        except FusionRankError as e:
            errors.append((str(doc[F.ID]), f"image dropped: {e}"))
            for k in (F.IMAGE_VEC, F.IMAGE_MODEL_ID, F.IMAGE_COLOUR):
                doc.pop(k, None)
            doc[F.HAS_IMAGE] = False
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
    for doc in docs:
        try:
            doc[F.IMAGE_COLOUR] = [float(x) for x in colour_descriptor(_read_photo(plan, doc))]
        except FusionRankError as e:
            errors.append((str(doc[F.ID]), f"image colour skipped: {e}"))


def fill(
    engine: SearchEngine,
    plan: ReindexPlan,
    record: JobRecord,
    *,
    encoders=None,
    checkpoint: Checkpoint = _no_checkpoint,
    on_batch: Callable[[FillBatchResult], None] | None = None,
) -> list[FillBatchResult]:
    """Fill the target in this process, skipping the batches the record has finished already."""
    enc = encoders or plan_encoders(plan)
    done = record.finished_batches()
    out = []
    for n, start, docs in iter_source_batches(engine, plan.source, plan.batch_size):
        if n in done:
            continue
        r = fill_batch(engine, plan, n, start, docs, encoders=enc)
        record.batch_done(r)
        out.append(r)
        if on_batch:
            on_batch(r)
        checkpoint(f"fill:{n}")
    engine.refresh(plan.target)
    return out


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
    "Generation", "JobRecord", "MemoryRecord", "current_generation", "create_target", "product_from_document",
    "iter_source_batches", "fill_batch", "fill", "count_batches", "verify", "swap", "generations", "rollback",
    "cleanup", "plan_encoders", "MappingError",
]
