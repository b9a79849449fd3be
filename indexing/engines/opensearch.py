"""``OpenSearchEngine``: the :class:`~indexing.engines.base.SearchEngine` protocol on opensearch-py.

- Index generations are created from the bodies in ``mappings/`` (``mappings.load_mapping``).
- ``swap_alias`` sends one ``_aliases`` request (remove every index behind the alias + add the new one),
  which OpenSearch applies atomically.
- ``bulk`` streams through ``opensearchpy.helpers.streaming_bulk``, chunked by count and by bytes; items
  rejected with 429 (the cluster is overloaded) are retried with exponential backoff a bounded number of
  times, every other per-item failure is reported with the document id and the server's reason while the
  rest of the batch is written.
- ``bm25_search`` is a ``multi_match`` (``best_fields``) over weighted fields; ``knn_search`` is the k-NN
  plugin's ``knn`` query with the filters as the knn query's own ``filter`` (efficient filtering: the
  filter is applied during the vector search, so ``k`` results come back even under a selective filter).
- Failures are mapped onto :mod:`indexing.errors`; messages name the URL with any password removed.

opensearch-py is imported lazily so that ``indexing`` loads without it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from indexing import fields as F
from indexing.engines.base import (
    BulkAction,
    BulkItemResult,
    BulkSummary,
    Filters,
    Hit,
    as_query_vector,
    check_size,
)
from indexing.errors import (
    BulkError,
    ConfigError,
    EngineAuthenticationError,
    EngineAuthorizationError,
    EngineConflictError,
    EngineError,
    EngineRequestError,
    EngineUnavailableError,
    IndexExistsError,
    IndexNotFoundError,
    MappingError,
    MissingDependencyError,
)

log = logging.getLogger(__name__)

_REDACTED = "**********"
_MGET_CHUNK = 1000
_SCROLL_KEEPALIVE = "2m"


#: HTTP status -> (error class, verb, hint) of a refused request, as opensearch-py's own ``HTTP_EXCEPTIONS`` table
#: (its exceptions.py); the index-not-found and already-exists answers are told apart by their error type first
HTTP_ERRORS: dict[int, tuple[type[EngineError], str, str]] = {
    400: (EngineRequestError, "rejected the request while", ""),
    401: (EngineAuthenticationError, "refused", " (check the credentials: FUSIONRANK_OPENSEARCH_USER / _PASSWORD)"),
    403: (EngineAuthorizationError, "refused", " (the credentials lack a permission for this index or action)"),
    404: (IndexNotFoundError, "found nothing while", ""),
    409: (EngineConflictError, "reported a conflict while", ""),
}


def _opensearchpy():
    try:
        import opensearchpy
        import opensearchpy.helpers
    except ImportError:  # pragma: no cover - opensearch-py is a runtime dependency
        raise MissingDependencyError("the OpenSearch engine needs opensearch-py: pip install 'opensearch-py>=2.6'") from None
    return opensearchpy


def redact_url(url: str) -> str:
    """``https://admin:secret@host:9200`` -> ``https://admin:**********@host:9200``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:{_REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def format_filters(filters: Filters | None) -> list[dict[str, Any]]:
    """Filter clauses for a ``bool.filter`` (or a knn query's ``filter``): ``term``/``terms`` and ``range``."""
    if filters is None or filters.is_empty():
        return []
    clauses: list[dict[str, Any]] = []
    for field, values in sorted(filters.term_values().items()):
        if not values:
            raise ConfigError(f"term filter on {field!r} has no values")
        clauses.append({"term": {field: values[0]}} if len(values) == 1 else {"terms": {field: list(values)}})
    for field, rng in sorted(filters.ranges.items()):
        bounds = rng.as_dict()
        if bounds:
            clauses.append({"range": {field: bounds}})
    return clauses


#: k-NN engines that need the plugin's native libraries
NATIVE_KNN_ENGINES = ("faiss", "nmslib")
#: node attribute by which a node says its k-NN has no native libraries (``node.attr.knn_native: false``)
KNN_NATIVE_ATTR = "knn_native"


def _as_arrays(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A source with its vector fields as read-only float32 numpy rows (what LocalEngine.get_arrays gives)."""
    out = dict(doc)
    for f in F.VECTOR_FIELDS:
        v = out.get(f)
        if v is not None and not isinstance(v, np.ndarray):
            a = np.asarray(v, dtype=np.float32)
            a.setflags(write=False)
            out[f] = a
    return out


def knn_similarity(space_type: str, score: float) -> float:
    """The similarity behind a k-NN plugin score, on LocalEngine's scale. OpenSearch translates similarities into
    non-negative scores (both the lucene and faiss engines, checked on a 2.19.1 node): ``innerproduct`` ->
    ``1 + ip`` for ip >= 0, ``1 / (1 - ip)`` below; ``cosinesimil`` -> ``(1 + cos) / 2``. This undoes it, so the
    models, trained on LocalEngine's raw inner products, read the same numbers behind either engine. ``l2``
    scores are ``1 / (1 + d^2)`` on both engines and stay as they are."""
    s = float(score)
    if space_type == "innerproduct":
        return s - 1.0 if s >= 1.0 else (1.0 - 1.0 / s if s > 0 else float("-inf"))
    if space_type == "cosinesimil":
        return 2.0 * s - 1.0
    return s


def _source_param(source: bool | Sequence[str]) -> bool | list[str]:
    if isinstance(source, bool):
        return source
    if isinstance(source, str):
        return [source]
    names = [str(s) for s in source]
    return names if names else False  # an empty include list would mean "everything" to OpenSearch


def _boosted(fields: Mapping[str, float]) -> list[str]:
    out = []
    for name, boost in fields.items():
        b = float(boost)
        if not np.isfinite(b) or b < 0:
            raise ConfigError(f"boost of field {name!r} must be a finite non-negative number, got {boost!r}")
        out.append(name if b == 1.0 else f"{name}^{b:g}")
    if not out:
        raise ConfigError("bm25_search needs at least one field")
    return out


def _error_reason(error: Any) -> str:
    """One line from an OpenSearch error object: ``type: reason (caused by: type: reason)``."""
    if isinstance(error, Mapping):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}".rstrip(": ")
        cause = error.get("caused_by")
        if isinstance(cause, Mapping):
            text += f" (caused by: {_error_reason(cause)})"
        return text
    return str(error)


class OpenSearchEngine:
    """A :class:`~indexing.engines.base.SearchEngine` backed by an OpenSearch cluster (k-NN plugin required)."""

    name = "opensearch"

    def __init__(
        self,
        url: str = "http://localhost:9200",
        *,
        http_auth: tuple[str, str] | str | None = None,
        verify_certs: bool = True,
        ca_certs: str | None = None,
        timeout_s: float = 10.0,
        client: Any = None,
        bulk_max_retries: int = 5,
        bulk_initial_backoff_s: float = 0.5,
        bulk_max_backoff_s: float = 30.0,
        doc_cache_size: int = 50_000,
    ):
        """``client``: an ``opensearchpy.OpenSearch`` to use instead of building one from ``url`` (for a
        custom transport or connection class); ``bulk_*``: retries of items rejected with 429; ``doc_cache_size``:
        documents :meth:`get_arrays` keeps parsed (0: none)."""
        if bulk_max_retries < 0 or bulk_initial_backoff_s < 0 or bulk_max_backoff_s < 0:
            raise ConfigError("bulk retry settings must be non-negative")
        self.url = url
        self.display_url = redact_url(url)
        self.timeout_s = float(timeout_s)
        self.bulk_max_retries = int(bulk_max_retries)
        self.bulk_initial_backoff_s = float(bulk_initial_backoff_s)
        self.bulk_max_backoff_s = float(bulk_max_backoff_s)
        self._secrets = [s for s in (self._password(url), self._auth_password(http_auth)) if s]
        self._props: dict[str, dict[str, Any]] = {}
        self._native: bool | None = None
        self.doc_cache_size = int(doc_cache_size)
        self._doc_cache: "collections.OrderedDict[tuple[str, str], tuple[int, int, frozenset, dict[str, Any]]]" = collections.OrderedDict()
        self.doc_cache_stats = {"hits": 0, "misses": 0}  # mapping properties per index/alias name (dims, spaces, text fields)
        self._lock = threading.Lock()
        if client is not None:
            self.client = client
            return
        os = _opensearchpy()
        if not verify_certs:
            log.warning("TLS certificate verification is OFF for OpenSearch at %s: anyone on the network path can impersonate the cluster", self.display_url)
        try:
            self.client = os.OpenSearch(
                hosts=[url],
                http_auth=http_auth,
                verify_certs=verify_certs,
                ssl_show_warn=verify_certs,
                ca_certs=ca_certs,
                timeout=self.timeout_s,
                max_retries=2,
                retry_on_timeout=False,
            )
        except Exception as e:  # bad URL, unreadable CA file...
            raise ConfigError(self._scrub(f"cannot configure the OpenSearch client for {self.display_url}: {e}")) from None

    # ------------------------------------------------------------------ secrets and errors
    @staticmethod
    def _password(url: str) -> str | None:
        try:
            return urlsplit(url).password
        except ValueError:
            return None

    @staticmethod
    def _auth_password(http_auth: Any) -> str | None:
        if isinstance(http_auth, (tuple, list)) and len(http_auth) == 2:
            return str(http_auth[1])
        if isinstance(http_auth, str) and ":" in http_auth:
            return http_auth.split(":", 1)[1]
        return None

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, _REDACTED)
        return text

    @contextlib.contextmanager
    def _errors(self, what: str, index: str | None = None) -> Iterator[None]:
        """Map opensearch-py exceptions onto the project's error types."""
        os = _opensearchpy()
        try:
            yield
        except os.ConnectionTimeout as e:
            raise EngineUnavailableError(self._scrub(
                f"OpenSearch at {self.display_url} did not answer within {self.timeout_s:g}s while {what} ({e.error})"
            )) from None
        except os.SSLError as e:
            raise EngineUnavailableError(self._scrub(
                f"TLS handshake with OpenSearch at {self.display_url} failed while {what}: {e.info or e.error} "
                "(check ca_certs / verify_certs)"
            )) from None
        except os.ConnectionError as e:
            raise EngineUnavailableError(self._scrub(
                f"cannot reach OpenSearch at {self.display_url} while {what}: {self._cause(e)}"
            )) from None
        except os.TransportError as e:
            raise self._map_transport_error(e, what, index) from None

    def _cause(self, e: Any) -> str:
        info = e.info
        text = str(info) if info is not None else str(e.error)
        for marker in ("Connection refused", "Name or service not known", "nodename nor servname", "Temporary failure in name resolution",
                       "No route to host", "Network is unreachable", "timed out", "Connection reset"):
            if marker in text:
                return marker
        return text[:300]

    def _map_transport_error(self, e: Any, what: str, index: str | None) -> EngineError:
        info = e.info if isinstance(e.info, Mapping) else {}
        err = info.get("error")
        etype = err.get("type") if isinstance(err, Mapping) else (err if isinstance(err, str) else str(e.error))
        root = (err.get("root_cause") or [{}])[0] if isinstance(err, Mapping) else {}
        reason = _error_reason(err) if err is not None else str(e.error)
        status = e.status_code
        if etype == "index_not_found_exception" or (isinstance(root, Mapping) and root.get("type") == "index_not_found_exception"):
            missing = (root.get("index") if isinstance(root, Mapping) else None) or (err.get("index") if isinstance(err, Mapping) else None) or index
            return IndexNotFoundError(self._scrub(f"index or alias {missing!r} does not exist in OpenSearch at {self.display_url} (while {what})"))
        if etype == "resource_already_exists_exception":
            return IndexExistsError(self._scrub(f"index {index!r} already exists in OpenSearch at {self.display_url}"))
        cls, verb, hint = HTTP_ERRORS.get(status, (EngineError, "failed", ""))
        return cls(self._scrub(f"OpenSearch at {self.display_url} {verb} {what}: HTTP {status} {reason}{hint}"))

    # ------------------------------------------------------------------ lifecycle
    def create_index(self, index: str, body: Mapping[str, Any]) -> None:
        body = dict(body)
        props = (body.get("mappings") or {}).get("properties") or {}
        dims = {f: spec.get("dimension") for f, spec in props.items() if isinstance(spec, Mapping) and spec.get("type") == "knn_vector"}
        for f, d in dims.items():
            if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
                raise MappingError(f"knn_vector field {f!r} of index {index!r} needs a positive integer dimension, got {d!r}")
        if dims and not self._knn_enabled(body.get("settings") or {}):
            raise MappingError(f"index {index!r} has knn_vector fields ({', '.join(dims)}) but its settings do not set index.knn: true")
        native = sorted(f for f, spec in props.items() if isinstance(spec, Mapping) and spec.get("type") == "knn_vector"
                        and (spec.get("method") or {}).get("engine", "faiss") in NATIVE_KNN_ENGINES)
        if native and not self._knn_native():
            raise MappingError(f"index {index!r}: {', '.join(native)} use a native k-NN engine (faiss/nmslib), and the k-NN plugin of "
                               f"OpenSearch at {self.display_url} has no native libraries (the Maven-built dev node): its writes would "
                               "hang. Create the index with hnsw_engine='lucene' (FUSIONRANK_HNSW_ENGINE=lucene)")
        with self._errors(f"creating index {index!r}", index):
            self.client.indices.create(index=index, body=body)
        with self._lock:
            self._props[index] = dict(props)
        log.info("created OpenSearch index %s (vector fields: %s)", index, dims or "none")

    def _knn_native(self) -> bool:
        """False when a node says its k-NN plugin has no native libraries (node attribute ``knn_native: false``, set
        by ``fusionrank opensearch dev-node`` and the test node): faiss and nmslib indices would accept the mapping,
        then fail every write (the refresh thread dies with UnsatisfiedLinkError). Unknown: True."""
        if self._native is None:
            try:
                rows = self.client.cat.nodeattrs(params={"format": "json", "h": "attr,value"})
                self._native = not any(isinstance(r, Mapping) and r.get("attr") == KNN_NATIVE_ATTR and str(r.get("value")).lower() == "false"
                                       for r in (rows if isinstance(rows, list) else ()))
            except Exception as e:  # an older or restricted cluster: assume a packaged k-NN
                log.debug("reading node attributes of %s failed (%s); assuming native k-NN engines", self.display_url, self._scrub(str(e)))
                self._native = True
        return self._native

    @staticmethod
    def _knn_enabled(settings: Mapping[str, Any]) -> bool:
        idx = settings.get("index") if isinstance(settings.get("index"), Mapping) else {}
        for v in (idx.get("knn"), settings.get("index.knn"), settings.get("knn")):
            if v is True or (isinstance(v, str) and v.lower() == "true"):
                return True
        return False

    def delete_index(self, index: str) -> None:
        with self._errors(f"deleting index {index!r}", index):
            self.client.indices.delete(index=index)
        self._forget(index)

    def index_exists(self, index: str) -> bool:
        with self._errors(f"checking whether index {index!r} exists", index):
            return bool(self.client.indices.exists(index=index))

    def list_indices(self, prefix: str) -> list[str]:
        if not prefix or any(c in prefix for c in "*,/ "):
            raise ConfigError(f"list_indices needs a plain non-empty name prefix, got {prefix!r}")
        with self._errors(f"listing indices {prefix}*"):
            rows = self.client.cat.indices(index=f"{prefix}*", params={"format": "json", "h": "index", "expand_wildcards": "open"})
        return sorted(r["index"] for r in rows or () if str(r.get("index", "")).startswith(prefix))

    def get_mapping(self, index: str) -> dict[str, Any]:
        """``{"mappings": {...}}`` of ``index`` (for an alias: of the newest index behind it)."""
        with self._errors(f"reading the mapping of {index!r}", index):
            resp = self.client.indices.get_mapping(index=index)
        if not resp:
            raise IndexNotFoundError(f"index or alias {index!r} does not exist in OpenSearch at {self.display_url}")
        concrete = sorted(resp)[-1]
        return {"mappings": resp[concrete].get("mappings") or {}}

    def refresh(self, index: str) -> None:
        with self._errors(f"refreshing {index!r}", index):
            self.client.indices.refresh(index=index)

    def count(self, index: str) -> int:
        """Exact document count: refreshes first so that documents written just before are counted."""
        self.refresh(index)
        with self._errors(f"counting documents in {index!r}", index):
            return int(self.client.count(index=index)["count"])

    # ------------------------------------------------------------------ aliases
    def get_alias(self, alias: str) -> list[str]:
        with self._errors(f"reading alias {alias!r}"):
            resp = self.client.indices.get_alias(name=alias, params={"ignore": 404})
        if isinstance(resp, Mapping) and isinstance(resp.get("status"), int) and "error" in resp:
            if resp["status"] == 404:
                return []  # no such alias: it points nowhere yet
            raise EngineError(self._scrub(f"OpenSearch at {self.display_url} failed reading alias {alias!r}: {_error_reason(resp['error'])}"))
        return sorted(name for name, spec in (resp or {}).items() if alias in (spec.get("aliases") or {}))

    def swap_alias(self, alias: str, index: str) -> list[str]:
        """Point ``alias`` at ``index`` alone in one atomic ``_aliases`` request; returns the previous indices."""
        if alias == index:
            raise ConfigError(f"alias and index must differ, both are {alias!r}")
        previous = self.get_alias(alias)
        actions: list[dict[str, Any]] = [{"remove": {"index": old, "alias": alias}} for old in previous if old != index]
        actions.append({"add": {"index": index, "alias": alias}})
        with self._errors(f"pointing alias {alias!r} at {index!r}", index):
            self.client.indices.update_aliases(body={"actions": actions})
        self._forget(alias)
        log.info("alias %s -> %s (was %s)", alias, index, previous or "unset")
        return previous

    def _forget(self, name: str) -> None:
        with self._lock:
            self._props.pop(name, None)

    # ------------------------------------------------------------------ documents
    def bulk(
        self,
        index: str,
        actions: Iterable[BulkAction],
        *,
        chunk_size: int = 500,
        max_chunk_bytes: int = 10 * 1024 * 1024,
        refresh: bool = False,
    ) -> BulkSummary:
        """Stream ``actions`` in chunks; retry 429 items only; report every other rejected item with its reason."""
        os = _opensearchpy()
        if chunk_size <= 0 or max_chunk_bytes <= 0:
            raise ConfigError(f"chunk_size and max_chunk_bytes must be positive, got {chunk_size} and {max_chunk_bytes}")
        seen_429 = [0]
        client = _CountingBulkClient(self.client, seen_429)

        def expand(actions: Iterable[BulkAction]) -> Iterator[dict[str, Any]]:
            for a in actions:
                if a.op == "index":
                    if a.doc is None:
                        raise ConfigError(f"index action for {a.id!r} has no document")
                    yield {"_op_type": "index", "_index": index, "_id": a.id, "_source": a.doc}
                elif a.op == "delete":
                    yield {"_op_type": "delete", "_index": index, "_id": a.id}
                else:
                    raise ConfigError(f"unknown bulk operation {a.op!r} for {a.id!r} (index or delete)")

        succeeded = 0
        failed: list[BulkItemResult] = []
        try:
            with self._errors(f"bulk writing to {index!r}", index):
                for ok, item in os.helpers.streaming_bulk(
                    client,
                    expand(actions),
                    chunk_size=chunk_size,
                    max_chunk_bytes=max_chunk_bytes,
                    raise_on_error=False,
                    raise_on_exception=True,
                    max_retries=self.bulk_max_retries,
                    initial_backoff=self.bulk_initial_backoff_s,
                    max_backoff=self.bulk_max_backoff_s,
                    yield_ok=True,
                ):
                    op, info = next(iter(item.items()))
                    status = int(info.get("status", 500))
                    doc_id = str(info.get("_id"))
                    if ok:
                        succeeded += 1
                        continue
                    if "error" in info:
                        reason = self._scrub(_error_reason(info["error"]))
                    else:  # deleting an id that is not there: {"result": "not_found", "status": 404}, as LocalEngine reports it
                        reason = str(info.get("result") or f"HTTP {status}")
                    failed.append(BulkItemResult(id=doc_id, op=op, ok=False, status=status, error=reason))
                    log.warning("bulk %s of %r into %s rejected: %s", op, doc_id, index, reason)
        except (IndexNotFoundError, EngineUnavailableError):
            raise
        except EngineError as e:
            raise BulkError(f"{e} (after {succeeded} documents were written and {len(failed)} rejected)") from None
        if refresh:
            self.refresh(index)
        final_429 = sum(1 for f in failed if f.status == 429)
        summary = BulkSummary(succeeded=succeeded, failed=tuple(failed), retried=seen_429[0] - final_429)
        log.info("bulk into %s: %d written, %d failed, %d retried after 429", index, summary.succeeded, len(summary.failed), summary.retried)
        return summary

    def get(self, index: str, ids: Sequence[str], *, fields: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Sources of the documents that exist among ``ids`` (``fields``: only these source fields)."""
        ids = [str(i) for i in ids]
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), _MGET_CHUNK):
            chunk = ids[start : start + _MGET_CHUNK]
            body: dict[str, Any] = (
                {"docs": [{"_id": i, "_source": [str(f) for f in fields]} for i in chunk]} if fields is not None else {"ids": chunk}
            )
            with self._errors(f"getting {len(chunk)} documents from {index!r}", index):
                resp = self.client.mget(index=index, body=body)
            for d in resp.get("docs", ()):
                if "error" in d:
                    raise EngineError(self._scrub(f"OpenSearch failed to get document {d.get('_id')!r} from {index!r}: {_error_reason(d['error'])}"))
                if d.get("found"):
                    out[str(d["_id"])] = dict(d.get("_source") or {})
        return out

    def get_arrays(self, index: str, ids: Sequence[str], *, fields: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """:meth:`get` with the vectors as read-only float32 numpy rows, for in-process readers such as the reranker
        (LocalEngine has the same method); not part of the engine protocol.

        Parsed documents are kept in a per-instance LRU (``doc_cache_size`` documents) keyed by (concrete index, id)
        and validated on every call by the documents' ``_seq_no`` / ``_primary_term``, read with one ``_mget`` that
        carries no source (~100 bytes a document). A write gives a document a new sequence number and an alias swap a
        new concrete index, so a cached entry is never served stale; only new or changed documents travel with
        their vectors. Why: OpenSearch answers vectors as JSON text, ~7 KB and ~3-5 ms of the cluster's time per
        product (100 products: ~0.3-0.5 s on the 2-core test node), against ~5 ms for the version check of all 100."""
        if isinstance(ids, str):
            raise ConfigError("get_arrays() takes a sequence of ids, not one string")
        ids = list(dict.fromkeys(str(i) for i in ids))
        if fields is None or self.doc_cache_size <= 0:
            return {i: _as_arrays(d) for i, d in self.get(index, ids, fields=fields).items()}
        want = tuple(str(f) for f in fields)
        versions: dict[str, tuple[str, int, int]] = {}
        for start in range(0, len(ids), _MGET_CHUNK):
            chunk = ids[start : start + _MGET_CHUNK]
            with self._errors(f"checking {len(chunk)} documents of {index!r}", index):
                resp = self.client.mget(index=index, body={"ids": chunk}, params={"_source": "false"})
            for d in resp.get("docs", ()):
                if "error" in d:
                    raise EngineError(self._scrub(f"OpenSearch failed to get document {d.get('_id')!r} from {index!r}: {_error_reason(d['error'])}"))
                if d.get("found"):
                    versions[str(d["_id"])] = (str(d.get("_index")), int(d.get("_seq_no", -1)), int(d.get("_primary_term", -1)))
        out: dict[str, dict[str, Any]] = {}
        missing: list[str] = []
        with self._lock:
            for i, (concrete, seq, term) in versions.items():
                hit = self._doc_cache.get((concrete, i))
                if hit is not None and hit[0] == seq and hit[1] == term and set(want) <= hit[2]:
                    self._doc_cache.move_to_end((concrete, i))
                    out[i] = hit[3]
                else:
                    missing.append(i)
        self.doc_cache_stats["hits"] += len(out)
        self.doc_cache_stats["misses"] += len(missing)
        if missing:
            fetched = self.get(index, missing, fields=want)
            with self._lock:
                for i, d in fetched.items():
                    doc = _as_arrays(d)
                    out[i] = doc
                    concrete, seq, term = versions[i]
                    # the version read before the fetch: a write in between makes the next check miss, never serve stale
                    self._doc_cache[(concrete, i)] = (seq, term, frozenset(want), doc)
                    self._doc_cache.move_to_end((concrete, i))
                while len(self._doc_cache) > self.doc_cache_size:
                    self._doc_cache.popitem(last=False)
        return {i: out[i] for i in ids if i in out}

    def prefill_doc_cache(self, index: str, fields: Sequence[str], *, limit: int | None = None, batch_size: int = 500) -> int:
        """Read up to ``limit`` (default: the cache's size) documents of ``index``, ``fields`` only, with their
        ``_seq_no``/``_primary_term``, into :meth:`get_arrays`' cache (one scroll); returns how many."""
        limit = self.doc_cache_size if limit is None else min(int(limit), self.doc_cache_size)
        if limit <= 0:
            return 0
        want = frozenset(str(f) for f in fields)
        body = {"size": min(batch_size, limit), "sort": ["_doc"], "query": {"match_all": {}}, "_source": sorted(want), "seq_no_primary_term": True}
        n = 0
        for hits in self._scroll(index, body, f"reading {index!r} into the document cache"):
            with self._lock:
                for h in hits[: limit - n]:
                    key = (str(h["_index"]), str(h["_id"]))
                    self._doc_cache[key] = (int(h.get("_seq_no", -1)), int(h.get("_primary_term", -1)), want, _as_arrays(h.get("_source") or {}))
                    self._doc_cache.move_to_end(key)
                    n += 1
                while len(self._doc_cache) > self.doc_cache_size:
                    self._doc_cache.popitem(last=False)
            if n >= limit:
                break
        return n

    def iter_documents(self, index: str, *, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every document's source (with the product id), streamed by a scroll in ``_doc`` order."""
        check_size(batch_size, "batch_size")
        if batch_size == 0:
            raise ConfigError("batch_size must be positive")
        for hits in self._scroll(index, {"size": batch_size, "sort": ["_doc"], "query": {"match_all": {}}}, f"scrolling through {index!r}"):
            for h in hits:
                doc = dict(h.get("_source") or {})
                doc.setdefault(F.ID, h["_id"])
                yield doc

    def _scroll(self, index: str, body: dict[str, Any], what: str) -> Iterator[list[dict[str, Any]]]:
        """The pages of hits of one scroll over ``index`` (``body``: its first request), cleared at the end."""
        with self._errors(what, index):
            resp = self.client.search(index=index, body=body, params={"scroll": _SCROLL_KEEPALIVE})
        scroll_id = resp.get("_scroll_id")
        try:
            while True:
                hits = resp.get("hits", {}).get("hits", [])
                if not hits:
                    return
                yield hits
                if not scroll_id:
                    return
                with self._errors(what, index):
                    resp = self.client.scroll(body={"scroll_id": scroll_id, "scroll": _SCROLL_KEEPALIVE})
                scroll_id = resp.get("_scroll_id", scroll_id)
        finally:
            if scroll_id:
                try:
                    self.client.clear_scroll(body={"scroll_id": [scroll_id]})
                except Exception as e:  # the scroll expires on its own; never hide the real outcome
                    log.debug("clearing scroll on %s failed: %s", index, self._scrub(str(e)))

    def iter_documents_by_id(self, index: str, *, after: str | None = None, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every document whose ``product_id`` sorts after ``after`` (all with None), in ascending product id order:
        pages sorted on the ``product_id`` keyword, each from ``search_after`` the last id of the one before (plus a
        ``range`` query, so a page skips the ids before it through the terms index). Unlike the scroll's ``_doc``
        order, which a segment merge changes, the order depends on the ids alone, so the last id read is a cursor.
        A document whose ``product_id`` is missing or differs from its ``_id`` raises EngineError (the sort key
        must be unique, or a page boundary could fall between two equal keys)."""
        check_size(batch_size, "batch_size")
        if batch_size == 0:
            raise ConfigError("batch_size must be positive")
        while True:
            body: dict[str, Any] = {"size": batch_size, "sort": [{F.ID: {"order": "asc"}}], "track_total_hits": False}
            if after is None:
                body["query"] = {"match_all": {}}
            else:
                body["query"] = {"range": {F.ID: {"gt": after}}}
                body["search_after"] = [after]
            with self._errors(f"reading {index!r} in product id order", index):
                resp = self.client.search(index=index, body=body)
            hits = resp.get("hits", {}).get("hits", [])
            for h in hits:
                key = (h.get("sort") or [None])[0]
                if key is None or str(key) != str(h["_id"]):
                    raise EngineError(self._scrub(
                        f"document {h['_id']!r} of {index!r} has {F.ID} {key!r}: reading in product id order needs every "
                        f"document's {F.ID} to equal its _id"
                    ))
                doc = dict(h.get("_source") or {})
                doc.setdefault(F.ID, h["_id"])
                yield doc
            if len(hits) < batch_size:
                return
            after = str(hits[-1]["sort"][0])

    # ------------------------------------------------------------------ search
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
        check_size(size)
        self._check_filters(index, filters)
        body = self.bm25_body(query, size=size, fields=fields, filters=filters, source=source)
        return self._search(index, body, source, f"BM25 search on {index!r}")

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
        check_size(k, "k")
        v = as_query_vector(vector, self._dim(index, field), field)
        self._check_filters(index, filters)
        body = self.knn_body(field, v, k=k, filters=filters, source=source)
        hits = self._search(index, body, source, f"kNN search on {index!r}.{field}")
        space = self._space(index, field)
        return [Hit(h.id, knn_similarity(space, h.score), h.source) for h in hits]

    @staticmethod
    def bm25_body(
        query: str,
        *,
        size: int,
        fields: Mapping[str, float] | None = None,
        filters: Filters | None = None,
        source: bool | Sequence[str] = False,
    ) -> dict[str, Any]:
        """The ``_search`` body of :meth:`bm25_search` (``multi_match`` best_fields + ``bool.filter``)."""
        if not isinstance(query, str):
            raise ConfigError(f"query must be a string, got {type(query).__name__}")
        mm = {"multi_match": {"query": query, "type": "best_fields", "fields": _boosted(fields if fields is not None else F.BM25_FIELDS)}}
        clauses = format_filters(filters)
        q: dict[str, Any] = {"bool": {"must": [mm], "filter": clauses}} if clauses else mm
        return {"size": size, "query": q, "_source": _source_param(source), "track_total_hits": False}

    @staticmethod
    def knn_body(field: str, vector: np.ndarray, *, k: int, filters: Filters | None = None, source: bool | Sequence[str] = False) -> dict[str, Any]:
        """The ``_search`` body of :meth:`knn_search`: the ``knn`` query with its own ``filter`` (efficient filtering)."""
        knn: dict[str, Any] = {"vector": [float(x) for x in vector], "k": k}
        clauses = format_filters(filters)
        if clauses:
            knn["filter"] = {"bool": {"filter": clauses}}
        return {"size": k, "query": {"knn": {field: knn}}, "_source": _source_param(source), "track_total_hits": False}

    def _search(self, index: str, body: dict[str, Any], source: bool | Sequence[str], what: str) -> list[Hit]:
        with self._errors(what, index):
            resp = self.client.search(index=index, body=body)
        shards = resp.get("_shards") or {}
        if shards.get("failed"):
            reasons = "; ".join(_error_reason((f or {}).get("reason")) for f in shards.get("failures") or ())
            if not resp.get("hits", {}).get("hits"):
                raise EngineError(self._scrub(f"{what} failed on {shards['failed']} shard(s) of OpenSearch at {self.display_url}: {reasons}"))
            log.warning("%s: %d shard(s) failed: %s", what, shards["failed"], reasons)
        want_source = source is not False and not (not isinstance(source, bool) and len(source) == 0)
        return [
            Hit(id=str(h["_id"]), score=float(h.get("_score") or 0.0), source=(dict(h.get("_source") or {}) if want_source else None))
            for h in resp.get("hits", {}).get("hits", [])
        ]

    def _properties(self, index: str, *, fresh: bool = False) -> dict[str, Any]:
        """Mapping properties of ``index`` (cached per index/alias name; an alias swap forgets the alias)."""
        with self._lock:
            props = None if fresh else self._props.get(index)
        if props is None:
            props = dict(self.get_mapping(index)["mappings"].get("properties") or {})
            with self._lock:
                self._props[index] = props
        return props

    def _vector_spec(self, index: str, field: str) -> Mapping[str, Any]:
        props = self._properties(index)
        if field not in props:
            props = self._properties(index, fresh=True)
        spec = props.get(field)
        if not (isinstance(spec, Mapping) and spec.get("type") == "knn_vector" and "dimension" in spec):
            vec = sorted(f for f, s in props.items() if isinstance(s, Mapping) and s.get("type") == "knn_vector")
            raise MappingError(f"{field!r} is not a knn_vector field of {index!r}; vector fields: {', '.join(vec) or 'none'}")
        return spec

    def _dim(self, index: str, field: str) -> int:
        """Dimension of ``field`` in ``index`` (from its mapping)."""
        return int(self._vector_spec(index, field)["dimension"])

    def _space(self, index: str, field: str) -> str:
        spec = self._vector_spec(index, field)
        return str((spec.get("method") or {}).get("space_type") or spec.get("space_type") or "l2")

    def _check_filters(self, index: str, filters: Filters | None) -> None:
        """Refuse a term filter on an analysed ``text`` field, as LocalEngine does: OpenSearch would match the
        exact value against the field's tokens and silently find nothing."""
        if filters is None or filters.is_empty():
            return
        props = self._properties(index)
        for f in filters.term_values():
            spec = props.get(f)
            if isinstance(spec, Mapping) and spec.get("type") == "text":
                subs = [n for n, sub in (spec.get("fields") or {}).items() if isinstance(sub, Mapping) and sub.get("type") == "keyword"]
                hint = f"; filter on its keyword sub-field {f + '.' + subs[0]!r}" if subs else ""
                raise ConfigError(f"cannot term-filter on analyzed text field {f!r}{hint}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> "OpenSearchEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenSearchEngine({self.display_url!r})"


class _CountingBulkClient:
    """Hands ``streaming_bulk`` the real client but counts the items each ``_bulk`` response rejected with 429,
    so that the summary can say how many items were retried (streaming_bulk itself does not report it)."""

    def __init__(self, client: Any, counter: list[int]):
        self._client = client
        self._counter = counter
        self.transport = client.transport

    def bulk(self, *args: Any, **kwargs: Any) -> Any:
        resp = self._client.bulk(*args, **kwargs)
        if resp.get("errors"):
            self._counter[0] += sum(1 for item in resp.get("items", ()) for info in item.values() if info.get("status") == 429)
        return resp


__all__ = ["OpenSearchEngine", "format_filters", "knn_similarity", "redact_url"]
