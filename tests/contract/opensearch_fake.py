"""A stand-in for one OpenSearch node at opensearch-py's connection boundary (no server can run here).

:class:`RecordingConnection` is an ``opensearchpy.Connection`` subclass: everything above it (the
``OpenSearch`` client, its API methods, the ``Transport`` with its serializer, retries and error
classes, ``helpers.streaming_bulk``) is the real opensearch-py. Where a real connection would write the
HTTP request to a socket, this one records ``(method, path, params, body bytes)`` and hands it to a
:class:`FakeOpenSearchServer`, which answers with status codes and JSON bodies shaped like real
OpenSearch responses. The shapes are those of the recorded request/response stories in the spec's
``tests/`` folder (``_core/bulk.yaml``, ``_core/search/knn/search/*.yaml``, ``indices/aliases.yaml``...),
and every 2xx answer is itself validated against the spec's response schema, so the fake cannot drift
into shapes a real cluster would never send.

The server keeps only the state that the answers need (indices with their mappings, aliases, stored
documents for ``_mget``/scroll). It does no ranking: search answers are the hits a test scripts with
:meth:`FakeOpenSearchServer.script_search` (or no hits).
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from opensearchpy import Connection, OpenSearch

from indexing.opensearch_spec import OpenSearchSpec

FAKE_URL = "http://fake-opensearch:9200"

#: bulk item hook: (op, index, id, doc, attempt) -> None (accept) or (status, error object)
BulkHook = Callable[[str, str, str, Mapping[str, Any] | None, int], tuple[int, dict[str, Any]] | None]


@dataclass(frozen=True)
class CapturedRequest:
    method: str
    path: str
    params: Mapping[str, Any]
    body: bytes | None
    operation: str

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in (self.body or b"").decode().splitlines() if line.strip()]


def _shards() -> dict[str, int]:
    return {"total": 1, "successful": 1, "skipped": 0, "failed": 0}


def error_body(status: int, etype: str, reason: str, **extra: Any) -> dict[str, Any]:
    """An OpenSearch error response (``{"error": {"root_cause": [...], "type", "reason"}, "status"}``)."""
    cause = {"type": etype, "reason": reason, **extra}
    return {"error": {"root_cause": [cause], **cause}, "status": status}


def index_not_found(name: str) -> tuple[int, dict[str, Any]]:
    return 404, error_body(404, "index_not_found_exception", f"no such index [{name}]", index=name,
                           **{"resource.id": name, "resource.type": "index_or_alias", "index_uuid": "_na_"})


@dataclass
class FakeOpenSearchServer:
    """Answers the endpoints ``OpenSearchEngine`` uses, the way OpenSearch 2.x/3.x does."""

    spec: OpenSearchSpec
    check_responses: bool = True
    requests: list[CapturedRequest] = field(default_factory=list)
    indices: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, set[str]] = field(default_factory=dict)
    docs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    bulk_hook: BulkHook | None = None
    #: (method, operation) -> (status, body) answered once instead of the normal answer
    faults: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    _search_hits: list[list[dict[str, Any]]] = field(default_factory=list)
    _bulk_attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    _scrolls: dict[str, tuple[int, list[dict[str, Any]]]] = field(default_factory=dict)

    # ------------------------------------------------------------------ test controls
    def client(self, **kwargs: Any) -> OpenSearch:
        """A real ``OpenSearch`` client whose connections talk to this server."""
        return OpenSearch(hosts=[FAKE_URL], connection_class=RecordingConnection, server=self, max_retries=0, **kwargs)

    def script_search(self, hits: list[tuple[str, float, dict[str, Any] | None]]) -> None:
        """The next ``_search`` answers with these (id, score, source) hits, in this order."""
        self._search_hits.append([{"_id": i, "_score": s, "_source": src} for i, s, src in hits])

    def fail_next(self, method: str, operation: str, status: int, body: Any) -> None:
        self.faults[(method.upper(), operation)] = (status, body)

    def of(self, operation: str) -> list[CapturedRequest]:
        return [r for r in self.requests if r.operation == operation]

    def resolve(self, name: str) -> list[str]:
        if name in self.indices:
            return [name]
        if name in self.aliases:
            return sorted(self.aliases[name])
        if name.endswith("*"):
            return sorted(n for n in self.indices if n.startswith(name[:-1]))
        return []

    # ------------------------------------------------------------------ HTTP
    def handle(self, method: str, path: str, params: Mapping[str, Any], body: bytes | None) -> tuple[int, dict[str, str], str]:
        operation = self.spec.operation_for(method, path)
        self.requests.append(CapturedRequest(method, path, dict(params), body, operation))
        fault = self.faults.pop((method, operation), None)
        if fault is not None:
            status, payload = fault
        else:
            handler = getattr(self, "_op_" + operation.replace(".", "_"), None)
            if handler is None:
                raise AssertionError(f"the fake OpenSearch does not answer {method} {path} ({operation}); extend it deliberately")
            segs = [s for s in path.split("?")[0].strip("/").split("/") if s]
            status, payload = handler(method, segs, params, body)
        if self.check_responses and 200 <= status < 300 and payload is not None and method != "HEAD":
            self.spec.validate_response(operation, status, payload)
        return status, {"content-type": "application/json"}, "" if payload is None else json.dumps(payload)

    # ------------------------------------------------------------------ indices
    def _op_indices_create(self, method, segs, params, body):
        name = segs[0]
        if name in self.indices or name in self.aliases:
            return 400, error_body(400, "resource_already_exists_exception", f"index [{name}/{uuid.uuid4().hex[:22]}] already exists", index=name)
        b = json.loads(body) if body else {}
        self.indices[name] = {"mappings": b.get("mappings", {}), "settings": b.get("settings", {})}
        self.docs[name] = {}
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _op_indices_exists(self, method, segs, params, body):
        return (200 if self.resolve(segs[0]) else 404), None

    def _op_indices_delete(self, method, segs, params, body):
        name = segs[0]
        if name not in self.indices:
            return index_not_found(name)
        del self.indices[name]
        self.docs.pop(name, None)
        for members in self.aliases.values():
            members.discard(name)
        return 200, {"acknowledged": True}

    def _op_indices_get_mapping(self, method, segs, params, body):
        names = self.resolve(segs[0])
        if not names:
            return index_not_found(segs[0])
        return 200, {n: {"mappings": self.indices[n]["mappings"]} for n in names}

    def _op_indices_refresh(self, method, segs, params, body):
        if not self.resolve(segs[0]):
            return index_not_found(segs[0])
        return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}

    def _op_cat_indices(self, method, segs, params, body):
        names = self.resolve(segs[-1]) if len(segs) > 2 else sorted(self.indices)
        return 200, [{"index": n} for n in names]

    def _op_count(self, method, segs, params, body):
        names = self.resolve(segs[0])
        if not names:
            return index_not_found(segs[0])
        return 200, {"count": sum(len(self.docs[n]) for n in names), "_shards": _shards()}

    # ------------------------------------------------------------------ aliases
    def _op_indices_get_alias(self, method, segs, params, body):
        alias = segs[-1]
        members = sorted(self.aliases.get(alias, ()))
        if not members:
            return 404, {"error": f"alias [{alias}] missing", "status": 404}
        return 200, {n: {"aliases": {alias: {}}} for n in members}

    def _op_indices_update_aliases(self, method, segs, params, body):
        actions = json.loads(body)["actions"]
        staged = {a: set(m) for a, m in self.aliases.items()}
        for action in actions:  # all or nothing, like the real cluster
            (kind, spec), = action.items()
            if spec["index"] not in self.indices:
                return index_not_found(spec["index"])
            if kind == "add":
                staged.setdefault(spec["alias"], set()).add(spec["index"])
            elif kind == "remove":
                if spec["index"] not in staged.get(spec["alias"], set()):
                    return 404, error_body(404, "aliases_not_found_exception", f"aliases [{spec['alias']}] missing", **{"resource.id": spec["alias"], "resource.type": "aliases"})
                staged[spec["alias"]].discard(spec["index"])
        self.aliases = {a: m for a, m in staged.items() if m}
        return 200, {"acknowledged": True}

    # ------------------------------------------------------------------ documents
    def _op_bulk(self, method, segs, params, body):
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        items, errors, i = [], False, 0
        seq = itertools.count()
        while i < len(lines):
            (op, meta), = lines[i].items()
            doc = lines[i + 1] if op in ("index", "create", "update") else None
            i += 2 if doc is not None else 1
            target = meta.get("_index") or segs[0]
            resolved = self.resolve(target)
            index = resolved[0] if len(resolved) == 1 else target  # writes through an alias of one index
            doc_id = meta.get("_id") or uuid.uuid4().hex
            key = (index, doc_id)
            attempt = self._bulk_attempts.get(key, 0)
            self._bulk_attempts[key] = attempt + 1
            base = {"_index": index, "_id": doc_id}
            verdict = self.bulk_hook(op, index, doc_id, doc, attempt) if self.bulk_hook else None
            if verdict is None and index not in self.indices:
                verdict = 404, index_not_found(index)[1]["error"]
            if verdict is not None:
                status, err = verdict
                items.append({op: {**base, "status": status, "error": err}})
                errors = True
                continue
            store = self.docs[index]
            if op == "delete":
                found = store.pop(doc_id, None) is not None
                items.append({op: {**base, "_version": 1, "result": "deleted" if found else "not_found", "_shards": {"total": 1, "successful": 1, "failed": 0},
                                   "_seq_no": next(seq), "_primary_term": 1, "status": 200 if found else 404}})
                continue
            created = doc_id not in store
            store[doc_id] = doc
            items.append({op: {**base, "_version": 1, "result": "created" if created else "updated", "_shards": {"total": 1, "successful": 1, "failed": 0},
                               "_seq_no": next(seq), "_primary_term": 1, "status": 201 if created else 200}})
        return 200, {"took": 3, "errors": errors, "items": items}

    def _op_mget(self, method, segs, params, body):
        b = json.loads(body)
        index = segs[0] if len(segs) > 1 else None
        wanted = [(d.get("_index", index), d["_id"], d.get("_source", True)) for d in b["docs"]] if "docs" in b else [(index, i, True) for i in b["ids"]]
        docs = []
        for idx, doc_id, src in wanted:
            names = self.resolve(idx)
            if not names:
                docs.append({"_index": idx, "_id": doc_id, "error": index_not_found(idx)[1]["error"]})
                continue
            stored = self.docs[names[0]].get(doc_id)
            if stored is None:
                docs.append({"_index": names[0], "_id": doc_id, "found": False})
                continue
            source = stored if src is True else {k: v for k, v in stored.items() if k in src}
            docs.append({"_index": names[0], "_id": doc_id, "_version": 1, "_seq_no": 0, "_primary_term": 1, "found": True, "_source": source})
        return 200, {"docs": docs}

    # ------------------------------------------------------------------ search
    def _op_search(self, method, segs, params, body):
        names = self.resolve(segs[0]) if len(segs) > 1 else sorted(self.indices)
        if not names:
            return index_not_found(segs[0])
        b = json.loads(body) if body else {}
        if "scroll" in params:
            all_hits = [{"_index": n, "_id": i, "_score": None, "_source": d, "sort": [k]}
                        for n in names for k, (i, d) in enumerate(self.docs[n].items())]
            scroll_id = uuid.uuid4().hex
            size = int(b.get("size", 10))
            self._scrolls[scroll_id] = (size, all_hits[size:])
            return 200, self._search_response(all_hits[:size], scroll_id=scroll_id, total=len(all_hits))
        if b.get("sort") and b["sort"] != ["_doc"]:
            return 200, self._sorted_search(names, b)
        scripted = self._search_hits.pop(0) if self._search_hits else []
        want = b.get("_source", True)
        hits = []
        for h in scripted[: int(b.get("size", 10))]:
            hit = {"_index": names[0], "_id": h["_id"], "_score": h["_score"]}
            if want is not False and h["_source"] is not None:
                hit["_source"] = h["_source"] if want is True else {k: v for k, v in h["_source"].items() if k in want}
            hits.append(hit)
        return 200, self._search_response(hits, total=len(hits))

    def _sorted_search(self, names: list[str], b: dict[str, Any]) -> dict[str, Any]:
        """A page of stored documents sorted ascending on one keyword field, as OpenSearch answers it: a ``range``
        ``gt`` query and ``search_after`` both start after a key; documents without the field come last, with a
        null sort value. Anything else this fake cannot answer truthfully, so it refuses."""
        (key,) = b["sort"]
        fld, order = (key, "asc") if isinstance(key, str) else next(iter(key.items()))
        order = order.get("order", "asc") if isinstance(order, dict) else order
        if order != "asc":
            raise AssertionError(f"the fake OpenSearch sorts ascending only, not {b['sort']!r}; extend it deliberately")
        query = b.get("query", {"match_all": {}})
        gt = None
        if "range" in query:
            (rfield, cond), = query["range"].items()
            if rfield != fld or set(cond) != {"gt"}:
                raise AssertionError(f"the fake OpenSearch answers a range gt on the sort field only, not {query!r}")
            gt = str(cond["gt"])
        elif query != {"match_all": {}}:
            raise AssertionError(f"the fake OpenSearch answers sorted searches with match_all or range only, not {query!r}")
        after = b.get("search_after")
        start = None if after is None else after[0]
        rows = [(None if d.get(fld) is None else str(d[fld]), n, i, d) for n in names for i, d in self.docs[n].items()]
        rows.sort(key=lambda r: (r[0] is None, r[0] or ""))
        if gt is not None:
            rows = [r for r in rows if r[0] is not None and r[0] > gt]
        if start is not None:
            rows = [r for r in rows if r[0] is not None and r[0] > str(start)]
        page = rows[: int(b.get("size", 10))]
        hits = [{"_index": n, "_id": i, "_score": None, "_source": d, "sort": [k]} for k, n, i, d in page]
        resp = self._search_response(hits, total=len(rows))
        if b.get("track_total_hits") is False:
            del resp["hits"]["total"]
        return resp

    def _op_scroll(self, method, segs, params, body):
        sid = json.loads(body)["scroll_id"]
        if sid not in self._scrolls:
            return 404, error_body(404, "search_context_missing_exception", f"No search context found for id [{sid}]")
        size, rest = self._scrolls[sid]
        page = rest[:size]
        self._scrolls[sid] = (size, rest[size:])
        return 200, self._search_response(page, scroll_id=sid, total=len(page))

    def _op_clear_scroll(self, method, segs, params, body):
        ids = json.loads(body)["scroll_id"] if body else []
        freed = sum(1 for s in ids if self._scrolls.pop(s, None) is not None)
        return 200, {"succeeded": True, "num_freed": freed}

    @staticmethod
    def _search_response(hits: list[dict[str, Any]], *, total: int, scroll_id: str | None = None) -> dict[str, Any]:
        scores = [h["_score"] for h in hits if h.get("_score") is not None]
        resp: dict[str, Any] = {
            "took": 2,
            "timed_out": False,
            "_shards": _shards(),
            "hits": {"total": {"value": total, "relation": "eq"}, "max_score": max(scores) if scores else None, "hits": hits},
        }
        if scroll_id:
            resp["_scroll_id"] = scroll_id
        return resp


class RecordingConnection(Connection):
    """An ``opensearchpy.Connection`` that hands each request to a :class:`FakeOpenSearchServer` instead of a socket."""

    def __init__(self, host: str = "localhost", port: int | None = None, *, server: FakeOpenSearchServer, **kwargs: Any):
        kwargs.pop("metrics", None)
        super().__init__(host=host, port=port, **kwargs)
        self.server = server

    def perform_request(self, method, url, params=None, body=None, timeout=None, ignore=(), headers=None):
        start = time.time()
        if isinstance(body, str):
            body = body.encode("utf-8")
        status, resp_headers, raw = self.server.handle(method, url, params or {}, body)
        full_url = self.host + self.url_prefix + url
        if not (200 <= status < 300) and status not in ignore:
            self.log_request_fail(method, full_url, url, body, time.time() - start, status, raw)
            self._raise_error(status, raw, resp_headers.get("content-type"))
        self.log_request_success(method, full_url, url, body, status, raw, time.time() - start)
        return status, resp_headers, raw
