"""``LocalEngine``: the embedded search engine (tantivy for BM25 and filters, numpy/faiss for vectors).

It follows the same mapping files as OpenSearch and implements :class:`~indexing.engines.base.SearchEngine`.

Semantics, stated once:

* **Persistence.** Everything lives under ``path``: ``aliases.json`` and one folder per index
  generation (``indices/<name>/``, see :mod:`indexing.engines.local_store`). A new LocalEngine on the
  same path (a restarted process) finds indices, documents, vectors and aliases again.
* **Writes and commits.** ``bulk`` is the unit of commit: it takes the index's write lock (an
  ``flock``, so writers in different processes -- Celery workers, reindex jobs -- are serialized),
  consumes the actions in chunks, and commits once at the end of the call. Per-item problems are
  recorded in the summary; an exception from the action stream itself rolls the whole call back.
* **Visibility.** A LocalEngine reads from a snapshot of each index (a tantivy searcher plus the
  vector matrices as of one commit). The instance that wrote sees its writes at its next read;
  other instances and processes see them after ``refresh(index)``, or by themselves once the
  index's ``settings.index.refresh_interval`` (``1s`` in products-v1, as in OpenSearch; ``-1``
  turns it off) has passed: a read then looks at the on-disk generation and reloads if it changed.
  A snapshot is loaded under a shared lock that commits take exclusively, so a reader never sees
  the documents of one commit with the vectors of another. A reload reads only the rows of newer
  commits and appends them to the matrix (see :class:`_VectorField`); the first load reads all.
* **Deletes** of an id that does not exist are per-item failures ``404`` / ``not_found``, as
  OpenSearch reports them. ``delete_index`` refuses an alias name (as OpenSearch does).
* **Aliases** are resolved on every call (the alias file is re-read when it changes on disk). A
  search resolves the alias once and runs on one complete index, so an alias swap is atomic for
  readers; ``swap_alias`` replaces ``aliases.json`` with write-to-temp + ``os.replace``.
* **BM25** is tantivy's. ``bm25_search`` builds a ``multi_match`` / ``best_fields`` query itself --
  a dis_max over the fields, each field a boosted OR of the query's terms -- from terms made by the
  field's own analyzer, so no user input goes through a query parser and none can raise.
* **kNN** is exact (one matrix-vector product over a contiguous float32 matrix) or, when a field has
  at least ``faiss_threshold`` vectors, a faiss HNSW search whose candidates are re-scored exactly.
  Filtered kNN pre-filters with tantivy and searches the matching subset exactly (recall 1.0)
  unless the subset itself reaches ``faiss_threshold``. Scores: ``innerproduct`` -> the inner
  product (the encoders normalize, so this is the cosine); ``cosinesimil`` -> the cosine;
  ``l2`` -> ``1 / (1 + squared distance)``.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from indexing import fields as F
from indexing.engines.base import JSON_ATOMS, BulkAction, BulkItemResult, BulkSummary, Filters, Hit, as_query_vector, check_size, copy_json
from indexing.engines.local_schema import (
    ID_FIELD,
    SEQ_FIELD,
    SOURCE_FIELD,
    FieldSpec,
    IndexSpec,
    ItemError,
    QueryAnalyzer,
    build_schema,
    filter_value,
    integer_bounds,
    parse_mapping,
    prepare_document,
    tightest,
    to_tantivy,
)
from indexing.engines.local_store import (
    LockPathMissing,
    Manifest,
    SegmentData,
    atomic_write_json,
    concat_segments,
    file_lock,
    keep_live,
    orphan_segments,
    plan_merge,
    read_manifest,
    read_segment,
    rows_after,
    segment_range,
    write_manifest,
    write_segment,
)
from indexing.errors import ConfigError, EngineError, IndexExistsError, IndexNotFoundError, MappingError, MissingDependencyError

log = logging.getLogger(__name__)

try:  # a dependency of the project (pyproject.toml); the stdlib where an installation lacks it
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover
    _fast_loads = json.loads


def load_source(raw: bytes | str) -> dict[str, Any]:
    """A stored ``_source`` parsed: by orjson (about 5x the stdlib's speed on a catalog document of ~400 bytes, the
    bulk of a cold fetch of a rerank call's hits), by the stdlib where orjson refuses what ``json.dumps`` wrote
    (NaN, Infinity, integers beyond 64 bits); both give the same values for everything else."""
    try:
        return _fast_loads(raw)
    except ValueError:  # orjson.JSONDecodeError is a ValueError
        return json.loads(raw)

ALIASES_FILE = "aliases.json"
INDICES_DIR = "indices"
ENGINE_LOCK = ".engine.lock"
WRITER_HEAP_BYTES = 96 * 1024 * 1024
SEGMENT_FLUSH_BYTES = 64 * 1024 * 1024  # vectors buffered in one bulk call before a segment file is written
_INVALID_NAME = re.compile(r'[\\/*?"<>| ,#:\x00-\x1f]')


def _import_tantivy():
    try:
        import tantivy
    except ImportError as e:  # pragma: no cover - tantivy is a core dependency
        raise MissingDependencyError("LocalEngine needs the 'tantivy' package: pip install tantivy") from e
    return tantivy


def check_name(name: str, what: str = "index") -> str:
    """OpenSearch's naming rules for indices and aliases (lowercase, no path characters, <= 255 bytes)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} name must be a non-empty string, got {name!r}")
    if name != name.lower() or _INVALID_NAME.search(name) or name[0] in "-_+." or len(name.encode()) > 255:
        raise ConfigError(
            f"invalid {what} name {name!r}: use lowercase, no spaces or any of \\ / * ? \" < > | , # :, "
            f"not starting with - _ + or ., at most 255 bytes"
        )
    return name


#: parsed stored sources kept for get_arrays() (per engine instance); about 1 KB each for a typical product
SOURCE_CACHE_SIZE = 20_000


# --------------------------------------------------------------------------- snapshots
class _VectorField:
    """The vectors of one field in one snapshot: a contiguous float32 matrix, row -> seq and row -> id.

    Rows live in a buffer with spare capacity. A newer snapshot appends the rows of new commits
    after this snapshot's last row -- rows this snapshot never reads -- so a reload costs the new
    rows, not the whole matrix. Rows of replaced or deleted documents stay until a compaction and
    are listed in ``dead`` (their scores are set to -inf); sequence numbers are never reused, so a
    row's content never changes.
    """

    def __init__(self, spec: FieldSpec, buf: np.ndarray, seq_buf: np.ndarray, ids: list[str], n: int, live: np.ndarray,
                 sq_buf: np.ndarray | None, owner: dict[str, int]):
        self.spec = spec
        self._buf, self._seq_buf, self._sq_buf, self._owner = buf, seq_buf, sq_buf, owner
        self.n = n
        self.matrix = buf[:n]  # a row prefix of a C-contiguous buffer: contiguous, no copy
        self.seqs = seq_buf[:n]  # ascending
        self.ids = ids  # row -> id (the list may be longer: rows of newer snapshots)
        self.sqnorms = sq_buf[:n] if sq_buf is not None else None
        alive = _member(self.seqs, live)
        self.dead = np.flatnonzero(~alive)
        self._hnsw = None
        self._hnsw_lock = threading.Lock()

    @classmethod
    def build(cls, spec: FieldSpec, seqs: np.ndarray, mat: np.ndarray, ids: list[str], live: np.ndarray) -> "_VectorField":
        """A fresh buffer holding ``mat`` (rows ascending by seq) and room to grow."""
        n = int(seqs.shape[0])
        cap = max(1024, n + n // 4)
        buf = np.empty((cap, spec.dim), dtype=np.float32)
        buf[:n] = mat
        seq_buf = np.empty(cap, dtype=np.int64)
        seq_buf[:n] = seqs
        sq_buf = None
        if spec.space_type != "innerproduct":
            sq_buf = np.empty(cap, dtype=np.float32)
            sq_buf[:n] = np.einsum("ij,ij->i", buf[:n], buf[:n])
        return cls(spec, buf, seq_buf, list(ids), n, live, sq_buf, {"n": n})

    def extended(self, seqs: np.ndarray, mat: np.ndarray, ids: list[str], live: np.ndarray) -> "_VectorField":
        """This field plus the rows of newer commits, as of the live set ``live``."""
        add = int(seqs.shape[0])
        n_new = self.n + add
        keep = _member(self.seqs, live)
        if (self.n - int(np.count_nonzero(keep))) * 4 > n_new:  # over a quarter of the rows are dead: compact
            old_ids = [i for i, k in zip(self.ids[: self.n], keep.tolist()) if k]
            return _VectorField.build(
                self.spec, np.concatenate([self.seqs[keep], seqs]), np.concatenate([self.matrix[keep], mat]), old_ids + list(ids), live
            )
        if self._owner["n"] == self.n and n_new <= self._buf.shape[0]:
            buf, seq_buf, sq_buf, ids_list, owner = self._buf, self._seq_buf, self._sq_buf, self.ids, self._owner
            del ids_list[self.n:]  # defensive: nothing past our rows belongs to a live snapshot
        else:  # grow (amortized doubling), or a sibling snapshot appended already: copy
            cap = max(1024, 2 * n_new)
            buf = np.empty((cap, self.spec.dim), dtype=np.float32)
            buf[: self.n] = self.matrix
            seq_buf = np.empty(cap, dtype=np.int64)
            seq_buf[: self.n] = self.seqs
            sq_buf = None
            if self._sq_buf is not None:
                sq_buf = np.empty(cap, dtype=np.float32)
                sq_buf[: self.n] = self.sqnorms
            ids_list, owner = list(self.ids[: self.n]), {"n": self.n}
        if add:
            buf[self.n:n_new] = mat
            seq_buf[self.n:n_new] = seqs
            if sq_buf is not None:
                sq_buf[self.n:n_new] = np.einsum("ij,ij->i", buf[self.n:n_new], buf[self.n:n_new])
            ids_list.extend(ids)
        owner["n"] = n_new
        return _VectorField(self.spec, buf, seq_buf, ids_list, n_new, live, sq_buf, owner)

    @property
    def live_count(self) -> int:
        return self.n - int(self.dead.size)

    def rows_of(self, seqs: np.ndarray) -> np.ndarray:
        """Rows holding the vectors of (live) documents ``seqs``; documents without this vector are dropped."""
        if self.n == 0 or seqs.size == 0:
            return np.empty(0, dtype=np.int64)
        pos = np.searchsorted(self.seqs, seqs)
        pos[pos == self.n] = 0
        return pos[self.seqs[pos] == seqs].astype(np.int64, copy=False)

    def scores(self, q: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Exact scores of ``q`` against all rows (dead rows: -inf) or against ``rows`` (live rows)."""
        if rows is None:
            ip = _matvec(self.matrix, q)
            sq = self.sqnorms
        elif rows.size * 4 > self.n:  # a large subset: one pass over the whole matrix beats a gather
            ip = _matvec(self.matrix, q)[rows]
            sq = self.sqnorms[rows] if self.sqnorms is not None else None
        else:
            ip = _matvec(self.matrix[rows], q)
            sq = self.sqnorms[rows] if self.sqnorms is not None else None
        st = self.spec.space_type
        if st == "innerproduct":
            out = ip
        elif st == "cosinesimil":
            out = ip / np.sqrt(np.maximum(sq * float(q @ q), 1e-30))
        else:
            out = 1.0 / (1.0 + np.maximum(sq - 2.0 * ip + float(q @ q), 0.0))
        if rows is None and self.dead.size:
            out[self.dead] = -np.inf
        return out

    def hnsw(self):
        """A faiss HNSW graph over this snapshot's rows (built once, on first use)."""
        with self._hnsw_lock:
            if self._hnsw is None:
                import faiss

                t0 = time.perf_counter()
                data = self.matrix
                if self.spec.space_type == "l2":
                    idx = faiss.IndexHNSWFlat(self.matrix.shape[1], self.spec.hnsw_m, faiss.METRIC_L2)
                else:
                    idx = faiss.IndexHNSWFlat(self.matrix.shape[1], self.spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                    if self.spec.space_type == "cosinesimil":
                        data = self.matrix / np.sqrt(np.maximum(self.sqnorms, 1e-30))[:, None]
                idx.hnsw.efConstruction = self.spec.hnsw_ef_construction
                idx.add(np.ascontiguousarray(data, dtype=np.float32))
                self._hnsw = idx
                log.info("built HNSW over %d vectors of %s in %.1fs", self.n, self.spec.name, time.perf_counter() - t0)
            return self._hnsw


def _live_rows(seqs: np.ndarray, mat: np.ndarray, ids: list[str], live: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    keep = _member(seqs, live)
    if keep.all():
        return seqs, mat, ids
    return seqs[keep], mat[keep], [i for i, k in zip(ids, keep.tolist()) if k]


def _member(seqs: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``seqs`` are in the ascending array ``live``."""
    if live.size == 0 or seqs.size == 0:
        return np.zeros(seqs.shape[0], dtype=bool)
    pos = np.searchsorted(live, seqs)
    pos[pos == live.size] = 0
    return live[pos] == seqs


@dataclass
class _Handle:
    """A process-wide open tantivy index and the spec derived from its mapping (one per index uuid)."""

    name: str
    uuid: str
    body: dict[str, Any]
    spec: IndexSpec
    index: Any  # tantivy.Index
    schema: Any


class _Unresolved(Exception):
    """A live document of the snapshot's map that tantivy did not return (never expected; the slow path answers)."""


@dataclass
class _State:
    """One immutable snapshot of an index: what every read uses, as of one commit generation."""

    handle: _Handle
    generation: int
    segments: tuple[str, ...]
    searcher: Any
    seqs: np.ndarray  # ascending sequence numbers of live documents
    ids: np.ndarray  # their ids
    vectors: dict[str, _VectorField] = field(default_factory=dict)
    loaded_upto: int = -1  # highest sequence number read from the store into this snapshot
    next_check: float = 0.0  # time.monotonic() after which the on-disk generation is looked at again

    @property
    def spec(self) -> IndexSpec:
        return self.handle.spec

    @property
    def schema(self):
        return self.handle.schema

    def seq_of(self) -> dict[str, int]:
        """``{id: sequence number}`` of the live documents, built on first use (the snapshot never changes)."""
        m = self.__dict__.get("_seq_of")
        if m is None:
            m = self.__dict__["_seq_of"] = dict(zip(self.ids.tolist(), self.seqs.tolist()))
        return m

    def ids_of(self, seqs: np.ndarray) -> list[str | None]:
        if self.seqs.size == 0 or seqs.size == 0:
            return [None] * int(seqs.size)
        pos = np.searchsorted(self.seqs, seqs)
        pos[pos == self.seqs.size] = 0
        ok = self.seqs[pos] == seqs
        return [str(self.ids[p]) if o else None for p, o in zip(pos.tolist(), ok.tolist())]


class _SegmentBuffer:
    """Documents written by one bulk call, waiting to become a vector segment."""

    def __init__(self, dims: Mapping[str, int]):
        self.dims = dict(dims)
        self.reset()

    def reset(self) -> None:
        self.seqs: list[int] = []
        self.ids: list[str] = []
        self.vecs: dict[str, tuple[list[int], list[np.ndarray]]] = {f: ([], []) for f in self.dims}
        self.nbytes = 0

    def add(self, seq: int, doc_id: str, vectors: Mapping[str, np.ndarray]) -> None:
        self.seqs.append(seq)
        self.ids.append(doc_id)
        self.nbytes += 16 + 4 * len(doc_id)
        for f, v in vectors.items():
            s, rows = self.vecs[f]
            s.append(seq)
            rows.append(v)
            self.nbytes += v.nbytes

    def data(self) -> SegmentData:
        vectors = {
            f: (np.asarray(s, dtype=np.int64), np.stack(rows).astype(np.float32, copy=False))
            for f, (s, rows) in self.vecs.items() if s
        }
        return SegmentData(np.asarray(self.seqs, dtype=np.int64), np.asarray(self.ids, dtype=str), vectors)

    def __len__(self) -> int:
        return len(self.seqs)


def _all_seqs(searcher, tantivy) -> np.ndarray:
    """Sequence numbers of every live document, ascending (tantivy sorts on the fast field)."""
    n = searcher.num_docs
    if n == 0:
        return np.empty(0, dtype=np.int64)
    r = searcher.search(tantivy.Query.all_query(), limit=n, count=False, order_by_field=SEQ_FIELD, order=tantivy.Order.Asc)
    return np.fromiter((h[0] for h in r.hits), dtype=np.int64, count=len(r.hits))


def _estimate_bytes(action: Any) -> int:
    doc = getattr(action, "doc", None)
    if not isinstance(doc, Mapping):
        return 64
    n = 64
    for v in doc.values():
        if isinstance(v, str):
            n += len(v)
        elif isinstance(v, (list, tuple, np.ndarray)):
            n += 10 * len(v)
        else:
            n += 16
    return n


def _chunks(actions: Iterable[Any], count: int, max_bytes: int) -> Iterator[list[Any]]:
    """Consume ``actions`` lazily in chunks of at most ``count`` items and about ``max_bytes``."""
    chunk: list[Any] = []
    size = 0
    for a in actions:
        chunk.append(a)
        size += _estimate_bytes(a)
        if len(chunk) >= count or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _matvec(m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``m @ q`` on one core: numpy's einsum kernel (SIMD, no BLAS threads).

    A matrix-vector product is memory-bound; multi-threaded BLAS gains little on it and, on a busy
    machine (workers, the API and encoders sharing the cores), its spinning threads make latencies
    several times worse. Single-threaded is both faster there and steadier everywhere.
    """
    return np.einsum("ij,j->i", m, q)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first (ties keep their input order)."""
    n = scores.shape[0]
    if k >= n:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    part.sort()
    return part[np.argsort(-scores[part], kind="stable")]


# --------------------------------------------------------------------------- the engine
class LocalEngine:
    """Embedded search engine persisted under ``path``; implements :class:`SearchEngine`.

    ``faiss_threshold``: fields with at least this many vectors are searched with a faiss HNSW graph
    (built on first use per snapshot) instead of exactly; ``None`` (default) keeps every search exact.
    """

    name = "local"

    def __init__(self, path: Path | str, *, faiss_threshold: int | None = None):
        self._tantivy = _import_tantivy()
        if faiss_threshold is not None:
            if isinstance(faiss_threshold, bool) or not isinstance(faiss_threshold, int) or faiss_threshold <= 0:
                raise ConfigError(f"faiss_threshold must be a positive integer or None, got {faiss_threshold!r}")
            try:
                import faiss  # noqa: F401
            except ImportError as e:
                raise MissingDependencyError("faiss_threshold needs the 'faiss-cpu' package: pip install faiss-cpu") from e
        self.faiss_threshold = faiss_threshold
        self.root = Path(path).expanduser().resolve()
        try:
            (self.root / INDICES_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the LocalEngine folder {self.root}: {e}") from None
        self._lock = threading.RLock()
        self._handles: dict[str, _Handle] = {}
        self._states: dict[str, _State] = {}
        self._stale: set[str] = set()
        self._alias_key: tuple[int, int, int] | None = None
        self._aliases: dict[str, str] = {}
        self._analyzer = QueryAnalyzer()
        # parsed stored sources for get_arrays(), keyed by (index uuid, sequence number): a sequence number is
        # never reused and its document never changes, so an entry can never go stale (no invalidation needed)
        self._source_cache: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        self._source_cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalEngine({str(self.root)!r}, faiss_threshold={self.faiss_threshold!r})"

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ paths, aliases, resolution
    def _dir(self, name: str) -> Path:
        return self.root / INDICES_DIR / name

    def _is_index(self, name: str) -> bool:
        return isinstance(name, str) and bool(name) and "/" not in name and not name.startswith(".") and (self._dir(name) / "index.json").is_file()

    def _read_aliases(self) -> dict[str, str]:
        """The alias table, re-read only when ``aliases.json`` changed on disk (inode, size, mtime)."""
        p = self.root / ALIASES_FILE
        try:
            st = os.stat(p)
        except FileNotFoundError:
            with self._lock:
                self._alias_key, self._aliases = None, {}
            return {}
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        # a file changed within the last 2 s is re-read even if its stat looks the same: two swaps in one
        # timestamp tick can reuse an inode number and a size ("racy" stat caching, as git calls it)
        recent = time.time_ns() - st.st_mtime_ns < 2_000_000_000
        with self._lock:
            if key != self._alias_key or recent:
                self._aliases = {str(k): str(v) for k, v in json.loads(p.read_text(encoding="utf-8")).items()}
                self._alias_key = key
            return self._aliases

    def _resolve(self, index: str) -> str:
        """The concrete index behind ``index`` (an index name or an alias)."""
        if self._is_index(index):
            return index
        target = self._read_aliases().get(index)
        if target is not None and self._is_index(target):
            return target
        if target is not None:
            raise IndexNotFoundError(f"alias {index!r} points at index {target!r}, which no longer exists (under {self.root})")
        raise IndexNotFoundError(f"no index or alias named {index!r} under {self.root}")

    # ------------------------------------------------------------------ handles and snapshots
    def _handle(self, name: str) -> _Handle:
        meta_path = self._dir(name) / "index.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IndexNotFoundError(f"no index named {name!r} under {self.root}") from None
        with self._lock:
            h = self._handles.get(name)
            if h is not None and h.uuid == meta["uuid"]:
                return h
            spec = parse_mapping(meta["body"])
            ix = self._tantivy.Index.open(str(self._dir(name) / "tantivy"))
            ix.config_reader("Manual")
            h = _Handle(name, meta["uuid"], meta["body"], spec, ix, ix.schema)
            self._handles[name] = h
            return h

    def _state(self, index: str) -> _State:
        """The snapshot reads use: reloaded after this instance wrote, after refresh(), or when another
        process committed and the index's ``refresh_interval`` has passed since the last look."""
        name = self._resolve(index)
        st = self._states.get(name)
        if st is not None and name not in self._stale and time.monotonic() < st.next_check:
            return st
        with self._lock:
            st = self._states.get(name)
            if st is not None and name not in self._stale:
                if time.monotonic() < st.next_check or self._current(name, st):
                    return st
            st = self._load_state(name, st)
            self._states[name] = st
            self._stale.discard(name)
            return st

    def _current(self, name: str, st: _State) -> bool:
        """Whether ``st`` is still the latest commit on disk (and schedules the next look)."""
        interval = st.spec.refresh_interval_s
        st.next_check = float("inf") if interval is None else time.monotonic() + interval
        if interval is None:
            return True
        try:
            m = read_manifest(self._dir(name) / "store")
        except FileNotFoundError:
            return True  # deleted by another process: keep serving the snapshot until refresh() says so
        return m.uuid == st.handle.uuid and m.generation == st.generation

    def _load_state(self, name: str, prev: _State | None) -> _State:
        t0 = time.perf_counter()
        h = self._handle(name)
        d = self._dir(name)
        dims = {f: s.dim for f, s in h.spec.vectors().items()}
        if prev is not None and prev.handle.uuid != h.uuid:
            prev = None
        try:
            with file_lock(d / "commit.lock", shared=True):
                m = read_manifest(d / "store")
                if m.uuid != h.uuid:
                    raise IndexNotFoundError(f"index {name!r} was deleted and re-created while loading; retry")
                h.index.reload()
                searcher = h.index.searcher()
                live = _all_seqs(searcher, self._tantivy)
                upto = prev.loaded_upto if prev is not None else -1
                # only segments holding rows newer than the previous snapshot (merged ones may straddle)
                parts = [read_segment(d / "store", s) for s in m.segments if segment_range(s)[1] > upto]
        except FileNotFoundError as e:
            raise IndexNotFoundError(f"index {name!r} disappeared while loading ({e.filename})") from None
        new = rows_after(concat_segments(parts, dims), upto)
        if prev is not None:
            docs = keep_live(SegmentData(np.concatenate([prev.seqs, new.seqs]), np.concatenate([prev.ids, new.ids])), live)
        else:
            docs = keep_live(SegmentData(new.seqs, new.ids), live)
        if docs.rows != live.size:
            log.warning("index %s: %d documents in tantivy but %d in the vector store", name, live.size, docs.rows)
        vectors = {}
        for f, s in h.spec.vectors().items():
            vseqs, mat = new.vectors[f]
            ids = new.ids[np.searchsorted(new.seqs, vseqs)].tolist() if vseqs.size else []
            if prev is not None and f in prev.vectors:
                vectors[f] = prev.vectors[f].extended(vseqs, mat, ids, live)
            else:
                vectors[f] = _VectorField.build(s, *_live_rows(vseqs, mat, ids, live), live)
        upto = max(upto, int(new.seqs[-1]) if new.rows else upto)
        log.debug("loaded %s generation %d (%d docs, %d new rows) in %.1f ms", name, m.generation, live.size, new.rows, (time.perf_counter() - t0) * 1e3)
        interval = h.spec.refresh_interval_s
        next_check = float("inf") if interval is None else time.monotonic() + interval
        return _State(h, m.generation, m.segments, searcher, docs.seqs, docs.ids, vectors, upto, next_check)

    # ------------------------------------------------------------------ lifecycle
    def create_index(self, index: str, body: Mapping[str, Any]) -> None:
        check_name(index)
        spec = parse_mapping(body)
        try:
            body_copy = json.loads(json.dumps(body))
        except (TypeError, ValueError) as e:
            raise MappingError(f"the index body for {index!r} is not JSON: {e}") from None
        with file_lock(self.root / ENGINE_LOCK):
            if self._is_index(index):
                raise IndexExistsError(f"index {index!r} already exists under {self.root}")
            if index in self._aliases_on_disk():
                raise IndexExistsError(f"cannot create index {index!r}: an alias of that name exists")
            tmp = self.root / INDICES_DIR / f".creating-{index}-{uuid.uuid4().hex[:8]}"
            try:
                (tmp / "tantivy").mkdir(parents=True)
                (tmp / "store").mkdir()
                uid = uuid.uuid4().hex
                self._tantivy.Index(build_schema(spec), path=str(tmp / "tantivy"))
                write_manifest(tmp / "store", Manifest(uuid=uid))
                atomic_write_json(tmp / "index.json", {"name": index, "uuid": uid, "created_at": time.time(), "body": body_copy})
                os.rename(tmp, self._dir(index))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("created index %s (%d fields, vectors: %s)", index, len(spec.fields), {f: s.dim for f, s in spec.vectors().items()})

    def delete_index(self, index: str) -> None:
        """Delete a concrete index and the aliases pointing at it (an alias name is refused, as OpenSearch does)."""
        if not self._is_index(index):
            if index in self._read_aliases():
                raise EngineError(f"{index!r} is an alias; delete the concrete index it points at ({self._read_aliases()[index]!r})")
            raise IndexNotFoundError(f"no index named {index!r} under {self.root}")
        d = self._dir(index)
        with file_lock(self.root / ENGINE_LOCK):
            if not self._is_index(index):
                raise IndexNotFoundError(f"no index named {index!r} under {self.root}")
            with file_lock(d / "write.lock"):  # let a running bulk call finish first
                aliases = self._aliases_on_disk()
                kept = {a: t for a, t in aliases.items() if t != index}
                if kept != aliases:
                    atomic_write_json(self.root / ALIASES_FILE, kept)
                tomb = self.root / INDICES_DIR / f".deleted-{index}-{uuid.uuid4().hex[:8]}"
                os.rename(d, tomb)
        shutil.rmtree(tomb, ignore_errors=True)
        with self._lock:
            self._states.pop(index, None)
            self._handles.pop(index, None)
            self._stale.discard(index)
        log.info("deleted index %s", index)

    def index_exists(self, index: str) -> bool:
        try:
            self._resolve(index)
            return True
        except IndexNotFoundError:
            return False

    def list_indices(self, prefix: str = "") -> list[str]:
        base = self.root / INDICES_DIR
        return sorted(p.name for p in base.iterdir() if p.name.startswith(prefix) and self._is_index(p.name))

    def get_mapping(self, index: str) -> dict[str, Any]:
        """``{"mappings": {...}}`` of the concrete index behind ``index`` (as given to create_index)."""
        h = self._handle(self._resolve(index))
        return {"mappings": copy.deepcopy(h.body["mappings"])}

    def refresh(self, index: str) -> None:
        """Make this instance read the latest commit of ``index`` (from any process)."""
        name = self._resolve(index)
        with self._lock:
            st = self._states.get(name)
            if st is not None and name not in self._stale:
                try:
                    meta = json.loads((self._dir(name) / "index.json").read_text(encoding="utf-8"))
                    m = read_manifest(self._dir(name) / "store")
                except FileNotFoundError:
                    raise IndexNotFoundError(f"index {name!r} was deleted") from None
                if meta["uuid"] == st.handle.uuid and m.uuid == st.handle.uuid and m.generation == st.generation:
                    return
            self._states[name] = self._load_state(name, st)
            self._stale.discard(name)

    def count(self, index: str) -> int:
        return int(self._state(index).searcher.num_docs)

    # ------------------------------------------------------------------ aliases
    def _aliases_on_disk(self) -> dict[str, str]:
        p = self.root / ALIASES_FILE
        try:
            return {str(k): str(v) for k, v in json.loads(p.read_text(encoding="utf-8")).items()}
        except FileNotFoundError:
            return {}

    def get_alias(self, alias: str) -> list[str]:
        t = self._read_aliases().get(alias)
        return [t] if t is not None else []

    def swap_alias(self, alias: str, index: str) -> list[str]:
        check_name(alias, "alias")
        target = self._resolve(index)
        with file_lock(self.root / ENGINE_LOCK):
            if self._is_index(alias):
                raise EngineError(f"cannot use {alias!r} as an alias: an index of that name exists")
            if not self._is_index(target):
                raise IndexNotFoundError(f"no index named {target!r} under {self.root}")
            aliases = self._aliases_on_disk()
            prev = [aliases[alias]] if alias in aliases else []
            aliases[alias] = target
            atomic_write_json(self.root / ALIASES_FILE, aliases)
        log.info("alias %s -> %s (was %s)", alias, target, prev or "unset")
        return prev

    # ------------------------------------------------------------------ writes
    def bulk(
        self,
        index: str,
        actions: Iterable[BulkAction],
        *,
        chunk_size: int = 500,
        max_chunk_bytes: int = 10 * 1024 * 1024,
        refresh: bool = False,
    ) -> BulkSummary:
        """Upsert (full replace by id) and delete documents; commits once, at the end of the call.

        ``actions`` is consumed lazily in chunks of ``chunk_size`` items / about ``max_chunk_bytes``.
        A rejected item (unknown field, wrong vector dimension, deleting a missing id -> ``not_found``)
        is reported with its id and reason; the rest is written.
        """
        for label, v in (("chunk_size", chunk_size), ("max_chunk_bytes", max_chunk_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{label} must be a positive integer, got {v!r}")
        name = self._resolve(index)
        h = self._handle(name)
        d = self._dir(name)
        t0 = time.perf_counter()
        try:
            with file_lock(d / "write.lock"):
                succeeded, failed = self._bulk_locked(name, h, d, actions, chunk_size, max_chunk_bytes)
        except LockPathMissing:
            raise IndexNotFoundError(f"index {name!r} was deleted") from None
        with self._lock:
            self._stale.add(name)
        if refresh:
            self.refresh(name)
        dt = time.perf_counter() - t0
        log.debug("bulk %s: %d ok, %d failed in %.2fs", name, succeeded, len(failed), dt)
        return BulkSummary(succeeded=succeeded, failed=tuple(failed))

    def _bulk_locked(
        self, name: str, h: _Handle, d: Path, actions: Iterable[BulkAction], chunk_size: int, max_chunk_bytes: int
    ) -> tuple[int, list[BulkItemResult]]:
        """The body of :meth:`bulk`, run while holding the index's write lock; returns (succeeded, failed)."""
        store = d / "store"
        spec, schema = h.spec, h.schema
        dims = {f: s.dim for f, s in spec.vectors().items()}
        succeeded = 0
        failed: list[BulkItemResult] = []
        try:
            meta = json.loads((d / "index.json").read_text(encoding="utf-8"))
            manifest = read_manifest(store)
        except FileNotFoundError:
            raise IndexNotFoundError(f"index {name!r} was deleted") from None
        if meta["uuid"] != h.uuid or manifest.uuid != h.uuid:
            raise IndexNotFoundError(f"index {name!r} was deleted and re-created; retry")
        for p in orphan_segments(store, manifest):
            log.warning("removing %s, left by a writer that did not publish it", p.name)
            p.unlink(missing_ok=True)
        h.index.reload()
        committed = h.index.searcher()
        writer = h.index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=1)
        buf = _SegmentBuffer(dims)
        pending: dict[str, int] = {}
        next_seq = manifest.next_seq
        added: set[str] = set()
        deleted: set[str] = set()
        published = False
        try:
            for chunk in _chunks(actions, chunk_size, max_chunk_bytes):
                existing = self._existing(committed, schema, chunk)
                for a in chunk:
                    if not isinstance(a, BulkAction):
                        failed.append(BulkItemResult(str(getattr(a, "id", "?")), str(getattr(a, "op", "?")), False, 400,
                                                     f"action_request_validation_exception: expected a BulkAction, got {type(a).__name__}"))
                        continue
                    if not isinstance(a.id, str) or not a.id:
                        failed.append(BulkItemResult(str(a.id), a.op, False, 400, "action_request_validation_exception: the document id must be a non-empty string"))
                        continue
                    present = a.id in added or (a.id in existing and a.id not in deleted)
                    if a.op == "delete":
                        if not present:
                            failed.append(BulkItemResult(a.id, "delete", False, 404, "not_found"))
                            continue
                        writer.delete_documents_by_term(ID_FIELD, a.id)
                        added.discard(a.id)
                        deleted.add(a.id)
                        succeeded += 1
                    elif a.op == "index":
                        try:
                            prepared = prepare_document(spec, a.doc)
                        except ItemError as e:
                            failed.append(BulkItemResult(a.id, "index", False, 400, str(e)))
                            continue
                        if present:
                            writer.delete_documents_by_term(ID_FIELD, a.id)
                        writer.add_document(to_tantivy(prepared, a.id, next_seq))
                        buf.add(next_seq, a.id, prepared.vectors)
                        next_seq += 1
                        added.add(a.id)
                        deleted.discard(a.id)
                        succeeded += 1
                        if buf.nbytes >= SEGMENT_FLUSH_BYTES:
                            data = buf.data()
                            pending[write_segment(store, data)] = data.rows
                            buf.reset()
                    else:
                        failed.append(BulkItemResult(a.id, str(a.op), False, 400, f"action_request_validation_exception: unknown op {a.op!r} (index or delete)"))
            if len(buf):
                data = buf.data()
                pending[write_segment(store, data)] = data.rows
                buf.reset()
            if succeeded:
                with file_lock(d / "commit.lock"):
                    manifest = manifest.published(next_seq=next_seq, add=pending)
                    write_manifest(store, manifest)
                    published = True
                    writer.commit()
                    writer.wait_merging_threads()  # merges finish (and the writer is released) under the lock
                    writer = None
                try:
                    self._maybe_merge(h, d, manifest)
                except Exception:  # the commit stands; an unmerged store is only slower to load
                    log.warning("merging vector segments of %s failed; they stay unmerged", name, exc_info=True)
        except BaseException:
            if writer is not None:
                try:
                    writer.rollback()
                except Exception:  # pragma: no cover - the original error matters more
                    log.exception("tantivy rollback failed for %s", name)
            if not published:
                for seg in pending:
                    (store / seg).unlink(missing_ok=True)
            raise
        finally:
            if writer is not None:
                writer.wait_merging_threads()
        return succeeded, failed

    def _existing(self, searcher, schema, chunk: list[Any]) -> set[str]:
        """Which of the chunk's ids the committed index holds (one term-set query per chunk)."""
        ids = list({a.id for a in chunk if isinstance(a, BulkAction) and isinstance(a.id, str) and a.id})
        if not ids or searcher.num_docs == 0:
            return set()
        q = self._tantivy.Query.term_set_query(schema, ID_FIELD, ids)
        r = searcher.search(q, limit=len(ids), count=False, order_by_field=ID_FIELD)
        return {h[0] for h in r.hits}

    def _maybe_merge(self, h: _Handle, d: Path, manifest: Manifest) -> None:
        """Merge vector segments (size-tiered) and drop rows of replaced/deleted documents.

        Runs under the write lock, after a commit; readers need no new generation for it (the
        content is unchanged), they pick up the merged files at their next load.
        """
        h.index.reload()
        searcher = h.index.searcher()
        start = plan_merge(manifest.sizes)
        if sum(manifest.sizes) > 2 * searcher.num_docs + 10_000:
            start = 0  # mostly dead rows: rewrite everything
        if start is None or (start == len(manifest.segments) - 1 and manifest.sizes[-1] <= searcher.num_docs):
            return
        store = d / "store"
        live = _all_seqs(searcher, self._tantivy)
        dims = {f: s.dim for f, s in h.spec.vectors().items()}
        old = manifest.segments[start:]
        data = keep_live(concat_segments([read_segment(store, s) for s in old], dims), live)
        new = (write_segment(store, data),) if data.rows else ()
        merged = Manifest(
            uuid=manifest.uuid, generation=manifest.generation, next_seq=manifest.next_seq,
            segments=manifest.segments[:start] + new, sizes=manifest.sizes[:start] + ((data.rows,) if new else ()),
        )
        with file_lock(d / "commit.lock"):
            write_manifest(store, merged)
        for s in old:
            (store / s).unlink(missing_ok=True)
        log.debug("merged %d vector segments of %s into %d rows", len(old), h.name, data.rows)

    # ------------------------------------------------------------------ reads
    def _sources(self, st: _State, addrs: list[Any] | None, seqs: np.ndarray, fields: Sequence[str] | None, *, arrays: bool = False,
                 ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Stored sources of documents (vectors added from the snapshot), projected on ``fields``.

        Vectors are lists of floats, or with ``arrays=True`` read-only float32 rows of one gathered copy.
        ``addrs=None`` (with ``arrays``, ``fields`` and the documents' ``ids``): addresses are looked up only for
        sources the cache misses."""
        want_vectors = list(st.vectors) if fields is None else [f for f in fields if f in st.vectors]
        out = []
        if arrays and fields is not None and len(want_vectors) == len(fields):
            out = [{} for _ in range(len(seqs))]  # vectors only (a profile's items): no stored source is read
        elif arrays and fields is not None:
            out = self._cached_sources(st, addrs, seqs, fields, ids=ids)
        else:
            for addr in addrs:
                src = load_source(st.searcher.doc(addr).get_first(SOURCE_FIELD))
                out.append(src if fields is None else {f: src[f] for f in fields if f in src})
        for f in want_vectors:
            vf = st.vectors[f]
            if vf.n == 0 or seqs.size == 0:
                continue
            pos = np.searchsorted(vf.seqs, seqs)
            pos[pos == vf.n] = 0
            has = np.flatnonzero(vf.seqs[pos] == seqs)
            if arrays:
                rows = vf.matrix[pos[has]]  # one gather (a copy: callers never see the snapshot's buffer)
                rows.flags.writeable = False
                for k, i in enumerate(has.tolist()):
                    out[i][f] = rows[k]
            else:
                for i in has.tolist():
                    out[i][f] = vf.matrix[pos[i]].tolist()
        return out

    def _cached_sources(self, st: _State, addrs: list[Any] | None, seqs: np.ndarray, fields: Sequence[str], *,
                        ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Sources projected on ``fields`` through the parsed-source cache (LRU, ``SOURCE_CACHE_SIZE`` entries).
        Values that are not str/number/bool/None are deep-copied, so callers never share the cached objects.
        ``addrs=None``: the misses' addresses are looked up by their ``ids``."""
        uid = st.handle.uuid
        keys = [(uid, s) for s in seqs.tolist()]
        cache = self._source_cache
        with self._source_cache_lock:
            got = [cache.get(k) for k in keys]
            for k, src in zip(keys, got):
                if src is not None:
                    cache.move_to_end(k)
        miss = [i for i, src in enumerate(got) if src is None]
        if miss:
            if addrs is None:
                if ids is None:
                    raise ValueError("_cached_sources needs addrs or ids")
                m_addrs, _, m_seqs = self._lookup(st, [ids[i] for i in miss])
                by_seq = dict(zip(m_seqs.tolist(), m_addrs))
                if any(keys[i][1] not in by_seq for i in miss):  # not expected: live seqs are tantivy's live documents
                    raise _Unresolved
                addr_of = {i: by_seq[keys[i][1]] for i in miss}
            else:
                addr_of = {i: addrs[i] for i in miss}
            for i in miss:
                got[i] = load_source(st.searcher.doc(addr_of[i]).get_first(SOURCE_FIELD))
            with self._source_cache_lock:
                for i in miss:
                    cache[keys[i]] = got[i]
                while len(cache) > SOURCE_CACHE_SIZE:
                    cache.popitem(last=False)
        atoms = JSON_ATOMS
        return [{f: v if type(v := src[f]) in atoms else copy_json(v) for f in fields if f in src} for src in got]

    def _lookup(self, st: _State, ids: Sequence[str]) -> tuple[list[Any], list[str], np.ndarray]:
        """Doc addresses, ids and sequence numbers of those ``ids`` that the snapshot holds."""
        uniq = list(dict.fromkeys(str(i) for i in ids))
        if not uniq:
            return [], [], np.empty(0, dtype=np.int64)
        q = self._tantivy.Query.term_set_query(st.schema, ID_FIELD, uniq)
        r = st.searcher.search(q, limit=len(uniq), count=False)
        addrs = [hit[1] for hit in r.hits]
        seqs = np.asarray(st.searcher.fast_field_values(SEQ_FIELD, addrs), dtype=np.int64)
        found = st.ids_of(seqs)
        keep = [i for i, x in enumerate(found) if x is not None]
        return [addrs[i] for i in keep], [found[i] for i in keep], seqs[keep]

    def get(self, index: str, ids: Sequence[str], *, fields: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """``{id: source}`` for the ids that exist; vectors come as lists of floats when asked for (or fields is None)."""
        if isinstance(ids, str):
            raise ConfigError("get() takes a sequence of ids, not one string")
        st = self._state(index)
        addrs, found, seqs = self._lookup(st, ids)
        return dict(zip(found, self._sources(st, addrs, seqs, fields)))

    def get_arrays(self, index: str, ids: Sequence[str], *, fields: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """:meth:`get` with the vectors as read-only float32 numpy rows instead of lists of floats (the same
        values: ``list(row)`` equals what :meth:`get` gives). For in-process readers such as the reranker,
        which would turn the lists straight back into arrays; not part of the engine protocol.

        With ``fields`` given, parsed sources are kept in a small per-instance LRU keyed by (index uuid,
        sequence number); a write gives the document a new sequence number, so a cached entry is never stale."""
        if isinstance(ids, str):
            raise ConfigError("get_arrays() takes a sequence of ids, not one string")
        st = self._state(index)
        if fields is not None:
            # ids -> sequence numbers from the snapshot's own map: the tantivy lookup (~0.4 ms for 100 ids) runs only
            # for the sources the cache does not hold
            seq_of = st.seq_of()
            found = [i for i in dict.fromkeys(map(str, ids)) if i in seq_of]
            seqs = np.fromiter((seq_of[i] for i in found), dtype=np.int64, count=len(found))
            try:
                return dict(zip(found, self._sources(st, None, seqs, fields, arrays=True, ids=found)))
            except _Unresolved:
                pass  # the tantivy lookup below answers
        addrs, found, seqs = self._lookup(st, ids)
        return dict(zip(found, self._sources(st, addrs, seqs, fields, arrays=True)))

    def ids(self, index: str) -> list[str]:
        """The ids of the live documents of the current snapshot (sequence order). Not part of the engine protocol."""
        return self._state(index).ids.tolist()

    def iter_documents(self, index: str, *, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every document's source (vectors included; ``product_id`` set from the id when absent), in write
        order, from one snapshot."""
        check_size(batch_size, "batch_size", limit=100_000)
        if batch_size == 0:
            raise ConfigError("batch_size must be at least 1")
        tv = self._tantivy
        st = self._state(index)
        last = -1
        while True:
            q = tv.Query.all_query() if last < 0 else tv.Query.range_query(st.schema, SEQ_FIELD, tv.FieldType.Unsigned, last + 1, None)
            r = st.searcher.search(q, limit=batch_size, count=False, order_by_field=SEQ_FIELD, order=tv.Order.Asc)
            if not r.hits:
                return
            seqs = np.fromiter((hit[0] for hit in r.hits), dtype=np.int64, count=len(r.hits))
            ids = st.ids_of(seqs)
            keep = [i for i, x in enumerate(ids) if x is not None]
            for i, src in zip(keep, self._sources(st, [r.hits[i][1] for i in keep], seqs[keep], None)):
                src.setdefault(F.ID, ids[i])  # as OpenSearchEngine does: the id is always there
                yield src
            last = int(seqs[-1])

    def iter_documents_by_id(self, index: str, *, after: str | None = None, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every document whose id sorts after ``after`` (all with None), in ascending id order (Python's ``str``
        order, the order OpenSearchEngine reads the ``product_id`` keyword in), from one snapshot. A document whose
        stored ``product_id`` is missing or differs from its id raises EngineError, as on OpenSearch."""
        check_size(batch_size, "batch_size", limit=100_000)
        if batch_size == 0:
            raise ConfigError("batch_size must be at least 1")
        st = self._state(index)
        ids = sorted(str(i) for i in st.ids.tolist())
        pos = 0 if after is None else bisect.bisect_right(ids, str(after))
        for lo in range(pos, len(ids), batch_size):
            chunk = ids[lo : lo + batch_size]
            addrs, found, seqs = self._lookup(st, chunk)
            by_id = dict(zip(found, self._sources(st, addrs, seqs, None)))
            for pid in chunk:
                src = by_id[pid]  # the snapshot's live ids are its documents
                if src.get(F.ID) is None or str(src[F.ID]) != pid:
                    raise EngineError(f"document {pid!r} of {index!r} has {F.ID} {src.get(F.ID)!r}: reading in product id "
                                      f"order needs every document's {F.ID} to equal its id")
                yield src

    # ------------------------------------------------------------------ queries
    def _filter_query(self, st: _State, filters: Filters | None):
        if filters is None or filters.is_empty():
            return None
        filters = filters.resolved()
        tv = self._tantivy
        Q, schema, spec = tv.Query, st.schema, st.spec
        clauses = []

        def field_spec(f: str) -> FieldSpec:
            s = spec.fields.get(f)
            if s is None or s.tantivy_name is None or s.kind == "vector":
                raise ConfigError(f"cannot filter on {f!r}: not an indexed field of index {st.handle.name!r}; filterable: {', '.join(spec.filterable())}")
            if s.kind == "text":
                subs = [x.name for x in spec.subfields_of(f) if x.kind == "keyword"]
                hint = f"; filter on its keyword sub-field {subs[0]!r}" if subs else ""
                raise ConfigError(f"cannot term-filter on analyzed text field {f!r}{hint}")
            return s

        for f, vals in filters.term_values().items():
            s = field_spec(f)
            if s.kind == "keyword":
                conv = [c for c in (filter_value(s, v) for v in vals) if c is not None]
                clauses.append(Q.term_set_query(schema, s.tantivy_name, conv) if conv else Q.empty_query())
            elif s.kind == "boolean":
                conv = {filter_value(s, v.lower() if isinstance(v, str) else v) for v in vals}
                clauses.append(Q.boolean_query([(tv.Occur.Should, Q.term_query(schema, s.tantivy_name, b)) for b in sorted(conv)]))
            else:
                ftype = tv.FieldType.Integer if s.kind == "integer" else tv.FieldType.Float
                conv = {filter_value(s, v) for v in vals}
                clauses.append(Q.boolean_query([(tv.Occur.Should, Q.range_query(schema, s.tantivy_name, ftype, c, c)) for c in sorted(conv)]))
        for f, r in filters.ranges.items():
            s = field_spec(f)
            if s.kind not in ("float", "integer", "date"):
                raise ConfigError(f"cannot range-filter on {f!r}: it is a {s.kind} field, not numeric or date")
            for b in (r.gte, r.gt, r.lte, r.lt):
                if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b)):
                    raise ConfigError(f"range bounds on {f!r} must be finite numbers, got {b!r}")
            lower = tightest([(v, inc) for v, inc in ((r.gte, True), (r.gt, False)) if v is not None], lower=True)
            upper = tightest([(v, inc) for v, inc in ((r.lte, True), (r.lt, False)) if v is not None], lower=False)
            if lower is None and upper is None:
                clauses.append(Q.exists_query(s.tantivy_name))
            elif s.kind == "integer":
                lo, hi = integer_bounds(lower, upper)
                if lo is not None and hi is not None and lo > hi:
                    clauses.append(Q.empty_query())
                else:
                    clauses.append(Q.range_query(schema, s.tantivy_name, tv.FieldType.Integer, lo, hi))
            else:
                clauses.append(Q.range_query(
                    schema, s.tantivy_name, tv.FieldType.Float,
                    None if lower is None else float(lower[0]), None if upper is None else float(upper[0]),
                    include_lower=True if lower is None else lower[1], include_upper=True if upper is None else upper[1],
                ))
        if len(clauses) == 1:
            return clauses[0]
        return Q.boolean_query([(tv.Occur.Must, c) for c in clauses])

    def _source_fields(self, source: bool | Sequence[str]) -> tuple[bool, Sequence[str] | None]:
        if source is True:
            return True, None
        if source is False or source is None:
            return False, None
        if isinstance(source, str):
            return True, [source]
        return True, list(source)

    def bm25_search(
        self,
        index: str,
        query: str,
        *,
        size: int = 100,
        fields: Mapping[str, float] | None = None,
        filters: Filters | None = None,
        source: bool | Sequence[str] = False,
    ) -> list[Hit]:
        """``multi_match`` (best_fields, OR) of ``query`` over ``fields`` (default :data:`fields.BM25_FIELDS`)."""
        check_size(size)
        if not isinstance(query, str):
            raise ConfigError(f"query must be a string, got {type(query).__name__}")
        tv = self._tantivy
        Q = tv.Query
        st = self._state(index)
        fq = self._filter_query(st, filters)
        if size == 0:
            return []
        per_field = []
        for fname, boost in (fields if fields is not None else F.BM25_FIELDS).items():
            if isinstance(boost, bool) or not isinstance(boost, (int, float)) or not math.isfinite(boost) or boost < 0:
                raise ConfigError(f"boost of field {fname!r} must be a finite number >= 0, got {boost!r}")
            s = st.spec.fields.get(fname)
            if s is None or s.tantivy_name is None or s.kind not in ("text", "keyword"):
                log.debug("bm25_search: field %r is not a searchable text field of %s; skipped", fname, st.handle.name)
                continue
            if s.kind == "text":
                terms = self._analyzer.terms(query, s.tokenizer)
            else:
                terms = [query.strip()] if query.strip() and (s.ignore_above is None or len(query.strip()) <= s.ignore_above) else []
            if not terms:
                continue
            tq = [Q.term_query(st.schema, s.tantivy_name, t) for t in terms]
            q = tq[0] if len(tq) == 1 else Q.boolean_query([(tv.Occur.Should, t) for t in tq])
            per_field.append(q if boost == 1 else Q.boost_query(q, float(boost)))
        if not per_field:
            return []
        main = per_field[0] if len(per_field) == 1 else Q.disjunction_max_query(per_field)
        if fq is not None:
            main = Q.boolean_query([(tv.Occur.Must, main), (tv.Occur.Must, Q.const_score_query(fq, 0.0))])
        r = st.searcher.search(main, limit=size, count=False)
        if not r.hits:
            return []
        addrs = [hit[1] for hit in r.hits]
        seqs = np.asarray(st.searcher.fast_field_values(SEQ_FIELD, addrs), dtype=np.int64)
        ids = st.ids_of(seqs)
        keep = [i for i, x in enumerate(ids) if x is not None]
        want, proj = self._source_fields(source)
        srcs = self._sources(st, [addrs[i] for i in keep], seqs[keep], proj) if want else [None] * len(keep)
        return [Hit(ids[i], float(r.hits[i][0]), s) for i, s in zip(keep, srcs)]

    def knn_search(
        self,
        index: str,
        field: str,
        vector: Sequence[float] | np.ndarray,
        *,
        k: int = 100,
        filters: Filters | None = None,
        source: bool | Sequence[str] = False,
    ) -> list[Hit]:
        """The ``k`` nearest documents on ``field``; with ``filters``, among the matching documents only."""
        check_size(k, "k")
        tv = self._tantivy
        st = self._state(index)
        vf = st.vectors.get(field)
        if vf is None:
            raise ConfigError(f"{field!r} is not a knn_vector field of index {st.handle.name!r}; vector fields: {', '.join(sorted(st.vectors)) or '(none)'}")
        q = as_query_vector(vector, vf.spec.dim, field)
        fq = self._filter_query(st, filters)
        k = min(k, vf.live_count)
        if k == 0:
            return []
        use_faiss = self.faiss_threshold is not None
        if fq is not None:
            n_match = st.searcher.num_docs
            r = st.searcher.search(fq, limit=max(n_match, 1), count=False, order_by_field=SEQ_FIELD, order=tv.Order.Asc)
            seqs = np.fromiter((hit[0] for hit in r.hits), dtype=np.int64, count=len(r.hits))
            rows = vf.rows_of(seqs)
            if rows.size == 0:
                return []
            if use_faiss and rows.size >= self.faiss_threshold:
                top_rows, scores = self._hnsw_search(vf, q, k, st.spec.ef_search, rows)
            else:
                s = vf.scores(q, rows)
                order = _topk(s, k)
                top_rows, scores = rows[order], s[order]
        elif use_faiss and vf.n >= self.faiss_threshold:
            top_rows, scores = self._hnsw_search(vf, q, k, st.spec.ef_search, None)
        else:
            s = vf.scores(q)
            top_rows = _topk(s, k)
            scores = s[top_rows]
        ids = [str(vf.ids[r]) for r in top_rows.tolist()]
        want, proj = self._source_fields(source)
        if want:
            addrs, found, seqs = self._lookup(st, ids)  # from the snapshot that was searched
            got = dict(zip(found, self._sources(st, addrs, seqs, proj)))
            return [Hit(i, float(sc), got.get(i)) for i, sc in zip(ids, scores.tolist())]
        return [Hit(i, float(sc)) for i, sc in zip(ids, scores.tolist())]

    def _hnsw_search(self, vf: _VectorField, q: np.ndarray, k: int, ef_search: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the HNSW graph (optionally restricted to ``rows``), re-scored exactly."""
        import faiss

        idx = vf.hnsw()
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef_search, k)
        sel = None
        if rows is not None:  # only these (live) rows
            sel = faiss.IDSelectorBatch(rows.astype(np.int64))
            params.sel = sel
        elif vf.dead.size:  # every row but the dead ones
            inner = faiss.IDSelectorBatch(vf.dead.astype(np.int64))
            sel = faiss.IDSelectorNot(inner)
            sel.inner = inner  # keep the wrapped selector alive as long as the outer one
            params.sel = sel
        qq = q if vf.spec.space_type != "cosinesimil" else q / max(float(np.linalg.norm(q)), 1e-30)
        _, labels = idx.search(np.ascontiguousarray(qq[None, :], dtype=np.float32), min(k, vf.n), params=params)
        cand = labels[0][labels[0] >= 0].astype(np.int64)
        s = vf.scores(q, cand)
        order = np.argsort(-s, kind="stable")
        del sel
        return cand[order], s[order]

    # ------------------------------------------------------------------ misc
    def close(self) -> None:
        """Drop the snapshots and open tantivy indices (nothing is pending: every bulk call committed)."""
        with self._lock:
            self._states.clear()
            self._handles.clear()
            self._stale.clear()
