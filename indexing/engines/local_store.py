"""On-disk pieces of LocalEngine besides tantivy: file locks, the per-index manifest, and vector segments.

Layout of one index folder::

    <root>/indices/<name>/
        index.json        the mapping body and a uuid (written once, when the index is created)
        tantivy/          the tantivy index (BM25, filters, ids, sequence numbers, stored sources)
        store/manifest.json   generation, next sequence number, the live vector segments, in order
        store/seg-*.npz   immutable segments: ``seqs`` + ``ids`` of the documents written in one bulk
                          call and, per vector field, ``vec:<field>`` (float32 rows) + ``vseq:<field>``
        write.lock        flock: one writer per index across processes (tantivy allows one writer)
        commit.lock       flock: held exclusively while a commit publishes, shared while a reader loads

Every file that readers open is written to a temporary name, fsynced and ``os.replace``-d, so a crash
never leaves a half-written manifest or segment. A document's vectors live in the segment written
with it; whether a row is live is decided by tantivy (a row is live when tantivy holds a document
with that sequence number), so tantivy stays the single source of truth for which documents exist.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".npz"


# --------------------------------------------------------------------------- locks
class LockPathMissing(FileNotFoundError):
    """The folder of a lock file is gone (its index was deleted)."""


@contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (created if missing); blocks until granted, released on exit.

    ``flock`` locks belong to the open file description, so two threads of one process that each
    take the lock exclude each other just as two processes do, and a crashed holder releases it.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        raise LockPathMissing(f"cannot lock {path}: its folder does not exist") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


# --------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    """What a reader loads: the commit generation, the next free sequence number and the live segments."""

    uuid: str
    generation: int = 0
    next_seq: int = 0
    segments: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()  # rows (documents) per segment, for the merge policy

    def published(self, *, next_seq: int, add: Mapping[str, int]) -> "Manifest":
        return replace(
            self,
            generation=self.generation + 1,
            next_seq=next_seq,
            segments=self.segments + tuple(add),
            sizes=self.sizes + tuple(add.values()),
        )


def read_manifest(store: Path) -> Manifest:
    raw = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    return Manifest(
        uuid=raw["uuid"],
        generation=int(raw["generation"]),
        next_seq=int(raw["next_seq"]),
        segments=tuple(raw["segments"]),
        sizes=tuple(int(x) for x in raw["sizes"]),
    )


def write_manifest(store: Path, m: Manifest) -> None:
    atomic_write_json(
        store / MANIFEST,
        {"uuid": m.uuid, "generation": m.generation, "next_seq": m.next_seq, "segments": list(m.segments), "sizes": list(m.sizes)},
    )


# --------------------------------------------------------------------------- segments
@dataclass
class SegmentData:
    """The arrays of one segment (or of several concatenated): documents and their vectors by field."""

    seqs: np.ndarray  # int64, ascending
    ids: np.ndarray  # unicode, aligned with seqs
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # field -> (vseqs int64, rows float32)

    @property
    def rows(self) -> int:
        return int(self.seqs.shape[0])


def new_segment_name(first_seq: int, last_seq: int) -> str:
    return f"{SEGMENT_PREFIX}{first_seq:016d}-{last_seq:016d}-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}"


def segment_range(name: str) -> tuple[int, int]:
    """(first, last) sequence number of the rows in segment ``name`` (from its file name)."""
    first, last = name[len(SEGMENT_PREFIX):].split("-")[:2]
    return int(first), int(last)


def rows_after(data: SegmentData, seq: int) -> SegmentData:
    """Only the rows with a sequence number above ``seq``."""
    if seq < 0:
        return data
    m = data.seqs > seq
    vectors = {}
    for f, (vseqs, mat) in data.vectors.items():
        vm = vseqs > seq
        vectors[f] = (vseqs[vm], mat[vm])
    return SegmentData(data.seqs[m], data.ids[m], vectors)


def write_segment(store: Path, data: SegmentData) -> str:
    """Write ``data`` as a new immutable segment (atomically) and return its file name."""
    name = new_segment_name(int(data.seqs[0]), int(data.seqs[-1]))
    arrays: dict[str, np.ndarray] = {"seqs": data.seqs.astype(np.int64, copy=False), "ids": data.ids}
    for f, (vseqs, mat) in data.vectors.items():
        arrays[f"vseq:{f}"] = vseqs.astype(np.int64, copy=False)
        arrays[f"vec:{f}"] = np.ascontiguousarray(mat, dtype=np.float32)
    tmp = store / f".{name}.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, store / name)
    _fsync_dir(store)
    return name


def read_segment(store: Path, name: str) -> SegmentData:
    with np.load(store / name, allow_pickle=False) as z:
        seqs, ids = z["seqs"], z["ids"]
        vectors = {k[4:]: (z[f"vseq:{k[4:]}"], z[k]) for k in z.files if k.startswith("vec:")}
    return SegmentData(seqs, ids, vectors)


def concat_segments(parts: list[SegmentData], vector_dims: Mapping[str, int]) -> SegmentData:
    """Concatenate segments in order (their sequence numbers ascend from one to the next)."""
    if not parts:
        return SegmentData(np.empty(0, np.int64), np.empty(0, dtype="<U1"), {f: (np.empty(0, np.int64), np.empty((0, d), np.float32)) for f, d in vector_dims.items()})
    seqs = np.concatenate([p.seqs for p in parts]) if len(parts) > 1 else parts[0].seqs
    ids = np.concatenate([p.ids for p in parts]) if len(parts) > 1 else parts[0].ids
    vectors = {}
    for f, d in vector_dims.items():
        vs = [p.vectors[f] for p in parts if f in p.vectors]
        if not vs:
            vectors[f] = (np.empty(0, np.int64), np.empty((0, d), np.float32))
        elif len(vs) == 1:
            vectors[f] = vs[0]
        else:
            vectors[f] = (np.concatenate([v[0] for v in vs]), np.concatenate([v[1] for v in vs]))
    return SegmentData(seqs, ids, vectors)


def keep_live(data: SegmentData, live_seqs: np.ndarray) -> SegmentData:
    """Only the rows whose sequence number tantivy holds (``live_seqs`` sorted ascending)."""

    def mask(seqs: np.ndarray) -> np.ndarray:
        if live_seqs.size == 0 or seqs.size == 0:
            return np.zeros(seqs.shape[0], dtype=bool)
        pos = np.searchsorted(live_seqs, seqs)
        pos[pos == live_seqs.size] = 0
        return live_seqs[pos] == seqs

    def select(arr: np.ndarray, m: np.ndarray) -> np.ndarray:
        return arr if m.all() else arr[m]  # no copy in the common case: nothing was replaced or deleted

    m = mask(data.seqs)
    vectors = {}
    for f, (vseqs, mat) in data.vectors.items():
        vm = mask(vseqs)
        vectors[f] = (select(vseqs, vm), np.ascontiguousarray(select(mat, vm)))
    return SegmentData(select(data.seqs, m), select(data.ids, m), vectors)


def plan_merge(sizes: tuple[int, ...], *, fanout: int = 4, max_segments: int = 24) -> int | None:
    """Start of the tail of segments to merge into one, or None (size-tiered, like a base-``fanout`` counter).

    The tail is merged when it holds ``fanout`` segments of the same size tier (tier = floor(log_fanout
    rows)), so each row is rewritten about log_fanout(N) times; past ``max_segments`` everything merges.
    """
    n = len(sizes)
    if n > max_segments:
        return 0
    if n < fanout:
        return None

    def tier(rows: int) -> int:
        t, r = 0, max(rows, 1)
        while r >= fanout:
            r //= fanout
            t += 1
        return t

    tail = tier(sizes[-1])
    i = n - 1
    while i > 0 and tier(sizes[i - 1]) <= tail:
        i -= 1
    return i if n - i >= fanout else None


def orphan_segments(store: Path, manifest: Manifest) -> list[Path]:
    """Segment files (and temp files) no manifest lists: left by a writer that crashed before publishing."""
    listed = set(manifest.segments)
    return [
        p for p in store.iterdir()
        if (p.name.startswith(SEGMENT_PREFIX) and p.name.endswith(SEGMENT_SUFFIX) and p.name not in listed)
        or (p.name.startswith(".") and p.name.endswith(".tmp"))
    ]
