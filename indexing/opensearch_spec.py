"""Check OpenSearch request (and response) bodies against the official OpenSearch API specification.

The specification (``opensearch-api-specification``: OpenAPI 3.1 YAML, one file per namespace under
``spec/namespaces/`` and shared schemas under ``spec/schemas/``) is loaded whole into a
``referencing`` registry, each file under its ``file://`` URI, so that the spec's cross-file ``$ref``s
(``../schemas/_common.query_dsl.yaml#/components/schemas/KnnQuery``) resolve. A body is validated
with jsonschema Draft 2020-12 against the schema of the operation's request body::

    namespaces/<ns>.yaml#/components/requestBodies/<name>/content/<media type>/schema

The operation -> request-body mapping is read from the spec's own ``paths`` (each path item names its
``x-operation-group`` and ``$ref``s its request body), so ``search`` resolves to
``_core.yaml#/components/requestBodies/search/content/application~1json/schema`` and ``indices.create``
to ``indices.yaml#/components/requestBodies/indices.create/...``. ``bulk`` is NDJSON
(``application~1x-ndjson``): see :meth:`OpenSearchSpec.request_violations` for what is checked there.

Strict mode (the default). The spec's object schemas are *open* (it never says
``additionalProperties: false``), so on its own it cannot catch an unknown mapping parameter or a
misspelt query key, which a real cluster rejects (``mapper_parsing_exception: unknown parameter``,
``parsing_exception: unknown field``). Strict mode closes every object schema that is a complete
object on its own with ``unevaluatedProperties: false``. Schemas that are only *parts* of another
object (``allOf`` members, ``oneOf``/``anyOf`` branches of a schema that declares properties itself,
``$ref`` targets with sibling keywords, and every inline schema nested inside such a part) stay open, because Draft 2020-12's ``unevaluatedProperties``
at the outermost schema already sees the properties its parts evaluate. Schemas that say
``additionalProperties`` (such as free-form ``settings``) are left as the spec wrote them.

jsonschema, referencing and PyYAML are imported lazily (they belong to the ``test`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from indexing.errors import ConfigError, FusionRankError, MissingDependencyError

log = logging.getLogger(__name__)

SPEC_ENV = "OPENSEARCH_API_SPEC"  # a test-environment variable (like OPENSEARCH_URL), not a product setting
_REPO_ROOT = Path(__file__).resolve().parent.parent
#: ``../shared/opensearch-api-spec/spec`` relative to the repository
DEFAULT_SPEC_DIR = _REPO_ROOT.parent / "shared" / "opensearch-api-spec" / "spec"

JSON = "application/json"
NDJSON = "application/x-ndjson"
_METHODS = ("get", "put", "post", "delete", "head", "patch")
_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SUBSCHEMA_DICT = ("properties", "patternProperties", "$defs", "dependentSchemas")
_SUBSCHEMA_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "propertyNames", "contains", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LIST = ("allOf", "oneOf", "anyOf", "prefixItems")
#: strict mode stores, in each schema it closes, the property names its parts declare (for error messages)
_DECLARED = "x-fusionrank-declared"


class SpecViolationError(FusionRankError, ValueError):
    """A request or response body does not conform to the OpenSearch API specification."""

    def __init__(self, operation: str, violations: Sequence["Violation"], what: str = "request body"):
        self.operation = operation
        self.violations = tuple(violations)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(f"{what} of OpenSearch operation {operation!r} violates the API specification ({len(self.violations)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class Violation:
    """One problem: where in the body (JSON pointer, or ``line N`` for NDJSON) and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"at {self.where or '/'}: {self.message}"


@dataclass(frozen=True)
class Operation:
    """One operation group of the spec (``search``, ``indices.create``...) and where its schemas live."""

    name: str
    file_uri: str
    request_body_ref: str | None  # '#/components/requestBodies/search' (relative to file_uri)
    responses: Mapping[str, str]  # status -> '#/components/responses/search@200'


@dataclass(frozen=True)
class _Route:
    method: str
    template: str
    segments: tuple[str | None, ...]  # None = path parameter
    operation: str


def _imports():
    try:
        import jsonschema
        import referencing
        import referencing.jsonschema
        import yaml
    except ImportError as e:  # pragma: no cover - exercised only without the test extra
        raise MissingDependencyError(
            f"checking bodies against the OpenSearch API spec needs jsonschema, referencing and PyYAML ({e.name} is missing): "
            "pip install 'fusionrank[test]'"
        ) from None
    return jsonschema, referencing, yaml


def spec_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The spec folder: ``path``, else ``$OPENSEARCH_API_SPEC``, else ``../shared/opensearch-api-spec/spec``."""
    raw = path if path is not None else os.environ.get(SPEC_ENV) or DEFAULT_SPEC_DIR
    p = Path(raw).expanduser().resolve()
    if (p / "spec" / "namespaces").is_dir():  # the repository root was given
        p = p / "spec"
    if not (p / "namespaces").is_dir():
        raise ConfigError(
            f"OpenSearch API spec not found at {p} (expected namespaces/*.yaml there); "
            f"set {SPEC_ENV} to the spec folder of opensearch-api-specification"
        )
    return p


# --------------------------------------------------------------------------- strict mode
def _pointer_join(ptr: str, *parts: str | int) -> str:
    for p in parts:
        ptr += "/" + str(p).replace("~", "~0").replace("/", "~1")
    return ptr


def _schema_nodes(doc: Mapping[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """(JSON pointer, node) of every schema object in one spec file."""
    comps = doc.get("components") or {}
    roots: list[tuple[str, Any]] = []
    for name, s in (comps.get("schemas") or {}).items():
        roots.append((_pointer_join("#/components/schemas", name), s))
    for section in ("requestBodies", "responses"):
        for name, item in (comps.get(section) or {}).items():
            for media, m in ((item or {}).get("content") or {}).items():
                if isinstance(m, dict) and "schema" in m:
                    roots.append((_pointer_join(f"#/components/{section}", name, "content", media, "schema"), m["schema"]))
    stack = [(p, s) for p, s in roots if isinstance(s, dict)]
    while stack:
        ptr, node = stack.pop()
        yield ptr, node
        for kw in _SUBSCHEMA_DICT:
            for k, sub in (node.get(kw) or {}).items() if isinstance(node.get(kw), dict) else ():
                if isinstance(sub, dict):
                    stack.append((_pointer_join(ptr, kw, k), sub))
        for kw in _SUBSCHEMA_ONE:
            sub = node.get(kw)
            if isinstance(sub, dict):
                stack.append((_pointer_join(ptr, kw), sub))
        for kw in _SUBSCHEMA_LIST:
            for i, sub in enumerate(node.get(kw) or ()):
                if isinstance(sub, dict):
                    stack.append((_pointer_join(ptr, kw, i), sub))


def _close_objects(docs: dict[str, dict[str, Any]]) -> int:
    """Add ``unevaluatedProperties: false`` to every complete object schema (see module doc); returns how many."""
    nodes: dict[tuple[str, str], dict[str, Any]] = {}
    for uri, doc in docs.items():
        for ptr, node in _schema_nodes(doc):
            nodes[(uri, ptr)] = node

    def target(uri: str, ref: str) -> tuple[str, str]:
        file, _, frag = ref.partition("#")
        base = uri if not file else Path(uri.removeprefix("file://")).parent.joinpath(file).resolve().as_uri()
        return base, "#" + frag

    parts: set[tuple[str, str]] = set()
    work: list[tuple[str, str]] = []

    def mark(key: tuple[str, str]) -> None:
        if key not in parts:
            parts.add(key)
            work.append(key)

    def mark_member(uri: str, ptr: str, kw: str, i: int, sub: dict[str, Any]) -> None:
        mark((uri, _pointer_join(ptr, kw, i)))
        if "$ref" in sub:
            mark(target(uri, sub["$ref"]))

    def describes(sub: Any) -> bool:
        return isinstance(sub, dict) and any(k in sub for k in ("properties", "additionalProperties", "patternProperties", "allOf", "oneOf", "anyOf", "$ref"))

    for (uri, ptr), node in nodes.items():
        declares = any(k in node for k in ("properties", "additionalProperties", "patternProperties", "allOf"))
        own = any(k in node for k in ("properties", "additionalProperties", "patternProperties"))
        members = node.get("allOf") or ()
        for i, sub in enumerate(members):
            # a member is a part when something beside it describes properties of the same object;
            # a lone member (``allOf: [$ref: X]``, an alias) is the whole object
            if own or any(describes(o) for j, o in enumerate(members) if j != i):
                mark_member(uri, ptr, "allOf", i, sub)
        if declares:
            for kw in ("oneOf", "anyOf"):
                for i, sub in enumerate(node.get(kw) or ()):
                    mark_member(uri, ptr, kw, i, sub)
        if "$ref" in node and any(k in node for k in ("properties", "allOf", "oneOf", "anyOf")):
            mark(target(uri, node["$ref"]))
    while work:  # a part's own union branches and plain $ref aliases are parts too
        uri, ptr = work.pop()
        node = nodes.get((uri, ptr))
        if node is None:
            continue
        for kw in ("allOf", "oneOf", "anyOf"):
            for i, sub in enumerate(node.get(kw) or ()):
                mark_member(uri, ptr, kw, i, sub)
        if "$ref" in node:
            mark(target(uri, node["$ref"]))

    # Everything nested inside a part is a partial view too: an allOf member may re-describe a property that a
    # sibling member also describes (HitsMetadataJsonValue narrows `hits.items` of HitsMetadata), so none of the
    # inline schemas below a part can be closed on its own.
    for uri, ptr in list(nodes):
        segs = ptr.split("/")
        if any((uri, "/".join(segs[:n])) in parts for n in range(2, len(segs))):
            parts.add((uri, ptr))

    declared_memo: dict[tuple[str, str], frozenset[str] | None] = {}

    def declared(key: tuple[str, str], guard: frozenset[tuple[str, str]] = frozenset()) -> frozenset[str] | None:
        """Property names a schema declares through its parts; ``None`` when it accepts any name."""
        if key in declared_memo:
            return declared_memo[key]
        node = nodes.get(key)
        if node is None or key in guard:
            return frozenset()
        if any(k in node and node[k] is not False for k in ("additionalProperties", "patternProperties")):
            declared_memo[key] = None
            return None
        names: set[str] = set(node.get("properties") or {})
        uri, ptr = key
        subs = [(_pointer_join(ptr, kw, i), sub) for kw in ("allOf", "oneOf", "anyOf") for i, sub in enumerate(node.get(kw) or ())]
        keys = [(uri, p) for p, _ in subs] + [target(uri, sub["$ref"]) for _, sub in subs if "$ref" in sub]
        if "$ref" in node:
            keys.append(target(uri, node["$ref"]))
        for k in keys:
            d = declared(k, guard | {key})
            if d is None:
                declared_memo[key] = None
                return None
            names |= d
        declared_memo[key] = frozenset(names)
        return declared_memo[key]

    closed = 0
    for key, node in nodes.items():
        if key in parts or any(k in node for k in _OPEN_KEYWORDS):
            continue
        t = node.get("type")
        if t is not None and t != "object" and not (isinstance(t, list) and "object" in t):
            continue
        if "properties" in node or "allOf" in node:
            names = declared(key)
            if names is None:
                continue  # one of its parts accepts any property name
            node["unevaluatedProperties"] = False
            node[_DECLARED] = sorted(names)
            closed += 1
    return closed


def _discriminator_value(docs: dict[str, dict[str, Any]], uri: str, ref: str, prop: str, depth: int = 0) -> list[Any] | None:
    """The value(s) a union branch requires for its discriminator property (searched through allOf and $ref)."""
    if depth > 12:
        return None
    file, _, frag = ref.partition("#")
    if file:
        uri = Path(uri.removeprefix("file://")).parent.joinpath(file).resolve().as_uri()
    node: Any = docs.get(uri)
    for part in [p.replace("~1", "/").replace("~0", "~") for p in frag.strip("/").split("/") if p]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return None
    spec = (node.get("properties") or {}).get(prop)
    if isinstance(spec, dict):
        if "const" in spec:
            return [spec["const"]]
        if isinstance(spec.get("enum"), list):
            return list(spec["enum"])
    for sub in node.get("allOf") or ():
        if isinstance(sub, dict):
            found = _discriminator_value(docs, uri, sub["$ref"], prop, depth + 1) if "$ref" in sub else (
                _discriminator_value({uri: {"x": sub}}, uri, "#/x", prop, depth + 1))
            if found:
                return found
    if "$ref" in node:
        return _discriminator_value(docs, uri, node["$ref"], prop, depth + 1)
    return None


def _dispatch_discriminators(docs: dict[str, dict[str, Any]]) -> int:
    """Turn ``oneOf`` unions with an OpenAPI ``discriminator`` into if/then dispatch on the discriminator value.

    Same accepted set as the ``oneOf`` when the branch values are distinct (checked), but each instance is
    validated against its one branch instead of all fifty (mapping properties), and errors name that branch.
    """
    rewritten = 0
    for uri, doc in docs.items():
        for _ptr, node in _schema_nodes(doc):
            disc = node.get("discriminator")
            branches = node.get("oneOf")
            if not isinstance(disc, dict) or not isinstance(branches, list) or not all(isinstance(b, dict) and "$ref" in b for b in branches):
                continue
            prop = disc.get("propertyName")
            values = [_discriminator_value(docs, uri, b["$ref"], prop) for b in branches]
            flat = [v for vs in values if vs for v in vs]
            if not prop or any(not vs for vs in values) or len(flat) != len(set(map(json.dumps, flat))):
                continue
            dispatch: list[dict[str, Any]] = [
                {"if": {"required": [prop], "properties": {prop: {"enum": vs}}}, "then": {"$ref": b["$ref"]}}
                for b, vs in zip(branches, values)
            ]
            dispatch.append({"properties": {prop: {"enum": flat}}})
            default = disc.get("x-default")
            default_ref = next((b["$ref"] for b, vs in zip(branches, values) if default in (vs or ())), None)
            missing: dict[str, Any] = {"$ref": default_ref} if default_ref else {"oneOf": branches}
            dispatch.append({"if": {"not": {"required": [prop]}}, "then": missing})
            node["allOf"] = list(node.get("allOf") or ()) + dispatch
            del node["oneOf"]
            rewritten += 1
    return rewritten


# --------------------------------------------------------------------------- the spec
class OpenSearchSpec:
    """The loaded specification: a path router, the operations, and validators for their bodies."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, strict: bool = True):
        jsonschema, referencing, yaml = _imports()
        from referencing.jsonschema import DRAFT202012

        self.dir = spec_dir(path)
        self.strict = strict
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        docs: dict[str, dict[str, Any]] = {}
        for f in sorted(self.dir.rglob("*.yaml")):
            with f.open("rb") as fh:
                doc = yaml.load(fh, Loader=loader)
            if isinstance(doc, dict):
                docs[f.resolve().as_uri()] = doc
        if not any("/namespaces/" in u for u in docs):
            raise ConfigError(f"no namespace files in the OpenSearch API spec at {self.dir}")
        self.closed_schemas = _close_objects(docs) if strict else 0
        self.dispatched_unions = _dispatch_discriminators(docs) if strict else 0
        self._docs = docs
        self.registry = referencing.Registry().with_resources(
            (uri, referencing.Resource.from_contents(doc, default_specification=DRAFT202012)) for uri, doc in docs.items()
        ).crawl()
        self._validator_cls = jsonschema.Draft202012Validator
        self._validators: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.operations: dict[str, Operation] = {}
        self._routes: list[_Route] = []
        self._index_paths()
        log.debug("loaded OpenSearch API spec from %s: %d files, %d operations, %d schemas closed (strict=%s)",
                  self.dir, len(docs), len(self.operations), self.closed_schemas, strict)

    # ------------------------------------------------------------------ routing
    def _index_paths(self) -> None:
        for uri, doc in self._docs.items():
            if "/namespaces/" not in uri:
                continue
            for template, item in (doc.get("paths") or {}).items():
                for method in _METHODS:
                    op = (item or {}).get(method)
                    if not isinstance(op, dict):
                        continue
                    name = op.get("x-operation-group") or op.get("operationId", "").rsplit(".", 1)[0]
                    body_ref = (op.get("requestBody") or {}).get("$ref")
                    responses = {str(k): v["$ref"] for k, v in (op.get("responses") or {}).items() if isinstance(v, dict) and "$ref" in v}
                    prev = self.operations.get(name)
                    if prev is None or (prev.request_body_ref is None and body_ref):
                        self.operations[name] = Operation(name, uri, body_ref, responses)
                    segs = tuple(None if re.fullmatch(r"\{[^}]+\}", s) else s for s in template.strip("/").split("/") if s)
                    self._routes.append(_Route(method.upper(), template, segs, name))

    def operation_for(self, method: str, path: str) -> str:
        """The operation a request goes to, e.g. ``("POST", "/products-v1/_search")`` -> ``"search"``.

        Path templates are matched segment by segment; literal segments win over parameters
        (``/_aliases`` is ``indices.update_aliases``, not ``PUT /{index}``).
        """
        method = method.upper()
        segs = [s for s in path.split("?", 1)[0].strip("/").split("/") if s]
        best: tuple[tuple[int, ...], _Route] | None = None
        for r in self._routes:
            if r.method != method or len(r.segments) != len(segs):
                continue
            if all(t is None or t == s for t, s in zip(r.segments, segs)):
                score = tuple(0 if t is None else 1 for t in r.segments)
                if best is None or score > best[0]:
                    best = (score, r)
        if best is None:
            raise SpecViolationError(f"{method} {path}", [Violation("", "no operation of the OpenSearch API spec matches this method and path")], "request")
        return best[1].operation

    def _operation(self, operation: str) -> Operation:
        try:
            return self.operations[operation]
        except KeyError:
            close = sorted(n for n in self.operations if n.split(".")[0] == operation.split(".")[0])[:20]
            raise ConfigError(f"the OpenSearch API spec has no operation {operation!r}" + (f"; did you mean one of: {', '.join(close)}" if close else "")) from None

    # ------------------------------------------------------------------ schemas
    def request_schema_ref(self, operation: str) -> tuple[str, str]:
        """(media type, absolute schema URI) of the operation's request body, e.g.
        ``('application/json', 'file:///.../namespaces/_core.yaml#/components/requestBodies/search/content/application~1json/schema')``."""
        op = self._operation(operation)
        if not op.request_body_ref:
            raise ConfigError(f"OpenSearch operation {operation!r} takes no request body")
        return self._content_schema(op.file_uri, op.request_body_ref, f"request body of {operation!r}")

    def response_schema_ref(self, operation: str, status: int | str = 200) -> tuple[str, str]:
        op = self._operation(operation)
        ref = op.responses.get(str(status))
        if ref is None:
            raise ConfigError(f"the spec describes no {status} response for {operation!r} (it has: {', '.join(op.responses) or 'none'})")
        return self._content_schema(op.file_uri, ref, f"{status} response of {operation!r}")

    def _content_schema(self, uri: str, ref: str, what: str) -> tuple[str, str]:
        resolved = self.registry.resolver(base_uri=uri).lookup(ref)
        content = (resolved.contents or {}).get("content") or {}
        for media in (JSON, NDJSON):
            if media in content:
                return media, f"{uri}{ref}/content/{media.replace('~', '~0').replace('/', '~1')}/schema"
        raise ConfigError(f"the spec's {what} has no JSON or NDJSON content (it has: {', '.join(content) or 'none'})")

    def _validator(self, schema_uri: str) -> Any:
        with self._lock:
            v = self._validators.get(schema_uri)
            if v is None:
                v = self._validator_cls({"$ref": schema_uri}, registry=self.registry)
                self._validators[schema_uri] = v
            return v

    def schema_violations(self, schema_uri: str, instance: Any, prefix: str = "") -> list[Violation]:
        """Violations of ``instance`` against the schema at ``schema_uri`` (absolute URI with fragment)."""
        out: list[Violation] = []
        for err in sorted(self._validator(schema_uri).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
            out.extend(_explain(err, prefix))
        return _dedupe(out)

    # ------------------------------------------------------------------ requests
    def request_violations(self, operation: str, body: Any) -> list[Violation]:
        """Every violation of ``body`` against the operation's request schema (empty list: valid).

        JSON operations take a dict (or its JSON text). NDJSON operations (``bulk``) take the NDJSON
        text/bytes or a list of line objects, and are checked on three levels:

        1. the whole list of lines against the spec's ``bulk`` request schema (an array whose items are
           an ``OperationContainer``, an ``UpdateAction`` or an object);
        2. the pairing the server expects: every action line must be an ``OperationContainer``
           (exactly one of ``index``/``create``/``update``/``delete`` with that operation's metadata,
           strict); ``index`` and ``create`` must be followed by a document line that is a JSON object;
           ``update`` by an ``UpdateAction``; ``delete`` by no document line;
        3. the NDJSON framing itself (one JSON value per line, a trailing newline).
        """
        media, schema_uri = self.request_schema_ref(operation)
        if media == NDJSON:
            return self._ndjson_violations(operation, schema_uri, body)
        if isinstance(body, (bytes, bytearray, str)):
            try:
                body = json.loads(body)
            except ValueError as e:
                return [Violation("", f"body is not valid JSON: {e}")]
        return self.schema_violations(schema_uri, body)

    def validate_request(self, operation: str, body: Any) -> None:
        """Raise :class:`SpecViolationError` listing every violation of ``body``; return ``None`` when valid."""
        v = self.request_violations(operation, body)
        if v:
            raise SpecViolationError(operation, v)

    def validate_response(self, operation: str, status: int, body: Any) -> None:
        """Check a response payload (used to keep test fakes honest) against the spec's response schema."""
        _media, uri = self.response_schema_ref(operation, status)
        v = self.schema_violations(uri, body)
        if v:
            raise SpecViolationError(operation, v, f"{status} response body")

    def validate_captured(self, method: str, path: str, body: Any) -> str:
        """Validate a request captured at the transport boundary; returns its operation name."""
        operation = self.operation_for(method, path)
        if body is not None and body != b"" and self.operations[operation].request_body_ref:
            self.validate_request(operation, body)
        return operation

    def _ndjson_violations(self, operation: str, schema_uri: str, body: Any) -> list[Violation]:
        out: list[Violation] = []
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8")
        if isinstance(body, str):
            if body and not body.endswith("\n"):
                out.append(Violation("line end", "NDJSON body must end with a newline"))
            lines: list[Any] = []
            for n, raw in enumerate(body.splitlines(), 1):
                if not raw.strip():
                    continue
                try:
                    lines.append(json.loads(raw))
                except ValueError as e:
                    out.append(Violation(f"line {n}", f"not valid JSON: {e}"))
                    return out
        else:
            lines = list(body)
        if not lines:
            return out + [Violation("", "empty bulk body")]
        out += self.schema_violations(schema_uri, lines)
        if operation not in ("bulk", "bulk_stream"):
            return out
        file = schema_uri.split("/namespaces/")[0]
        container = f"{file}/schemas/_core.bulk.yaml#/components/schemas/OperationContainer"
        update = f"{file}/schemas/_core.bulk.yaml#/components/schemas/UpdateAction"
        i = 0
        while i < len(lines):
            action = lines[i]
            where = f"line {i + 1}"
            out += self.schema_violations(container, action, where)
            op = next(iter(action)) if isinstance(action, dict) and len(action) == 1 else None
            if op not in ("index", "create", "update", "delete"):
                if not out or out[-1].where.split(" /")[0] != where:
                    out.append(Violation(where, f"expected an action line (index, create, update or delete), got {_short(action)}"))
                i += 1  # cannot tell whether a document line follows; resynchronise on the next line
                continue
            if op == "delete":
                i += 1
                continue
            if i + 1 >= len(lines):
                out.append(Violation(where, f"{op!r} action has no document line after it"))
                break
            doc = lines[i + 1]
            if op == "update":
                out += self.schema_violations(update, doc, f"line {i + 2}")
            elif not isinstance(doc, dict):
                out.append(Violation(f"line {i + 2}", f"the document of an {op!r} action must be a JSON object, got {type(doc).__name__}"))
            elif len(doc) == 1 and next(iter(doc)) in ("index", "create", "update", "delete") and isinstance(doc[next(iter(doc))], dict):
                out.append(Violation(f"line {i + 2}", f"expected the document of the {op!r} action, found another action line"))
            i += 2
        return out


# --------------------------------------------------------------------------- error explanation
def _where(err: Any, prefix: str) -> str:
    ptr = "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in err.absolute_path)
    return f"{prefix} {ptr}".strip() if prefix else ptr


def _explain(err: Any, prefix: str) -> list[Violation]:
    """Turn one jsonschema error into precise violations; for ``oneOf``/``anyOf`` (the spec's discriminated
    unions) descend into the branches that match the instance's kind instead of reporting "not valid under any"."""
    if err.validator in ("oneOf", "anyOf") and err.context:
        branches: dict[int, list[Any]] = {}
        for sub in err.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        depth = len(err.absolute_path)

        def wrong_kind(sub: Any) -> bool:
            rel = len(sub.absolute_path) - depth
            if sub.validator == "type" and rel == 0:
                return True
            if sub.validator in ("enum", "const") and rel == 1:  # discriminator such as {"type": "keyword"}
                return True
            if sub.validator == "required" and rel == 0 and isinstance(err.instance, dict) and len(err.instance) <= 1:
                return True
            return False

        plausible = [errs for errs in branches.values() if not any(wrong_kind(s) for s in errs)]
        if plausible:
            best = min(plausible, key=len)
            out: list[Violation] = []
            for sub in best:
                out.extend(_explain(sub, prefix))
            return out
        kinds = sorted({str(s.validator_value) for errs in branches.values() for s in errs if s.validator in ("enum", "const")})[:12]
        hint = f" (expected one of the kinds {', '.join(kinds)})" if kinds else ""
        return [Violation(_where(err, prefix), f"{_short(err.instance)} matches none of the {len(branches)} allowed forms{hint}")]
    if err.validator == "unevaluatedProperties" and isinstance(err.instance, dict) and _DECLARED in err.schema:
        unknown = sorted(set(err.instance) - set(err.schema[_DECLARED]))
        if not unknown:
            return []  # the keys are declared; a part failed for another reason, reported on its own
        allowed = ", ".join(err.schema[_DECLARED][:40])
        return [Violation(_where(err, prefix), f"unknown parameter(s) {', '.join(map(repr, unknown))}; allowed here: {allowed}")]
    return [Violation(_where(err, prefix), err.message)]


def _short(x: Any) -> str:
    s = json.dumps(x, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def _dedupe(vs: list[Violation]) -> list[Violation]:
    seen: set[Violation] = set()
    out = []
    for v in vs:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


# --------------------------------------------------------------------------- module-level API
@lru_cache(maxsize=4)
def _load_cached(path: str, strict: bool) -> OpenSearchSpec:
    return OpenSearchSpec(path, strict=strict)


def load_spec(path: str | os.PathLike[str] | None = None, *, strict: bool = True) -> OpenSearchSpec:
    """The spec at ``path`` (see :func:`spec_dir`), loaded once per process and folder."""
    return _load_cached(str(spec_dir(path)), strict)


def validate_request(operation: str, body: Any, *, spec: str | os.PathLike[str] | None = None, strict: bool = True) -> None:
    """Validate ``body`` against the request schema of ``operation`` (``search``, ``indices.create``, ``bulk``,
    ``mget``, ``indices.update_aliases``, ``search_pipeline.put``...); raise :class:`SpecViolationError`."""
    load_spec(spec, strict=strict).validate_request(operation, body)


def operation_for(method: str, path: str, *, spec: str | os.PathLike[str] | None = None) -> str:
    """Map a captured request's (method, path) to its operation, e.g. ``PUT /products-v1`` -> ``indices.create``."""
    return load_spec(spec).operation_for(method, path)


__all__ = [
    "DEFAULT_SPEC_DIR",
    "SPEC_ENV",
    "OpenSearchSpec",
    "Operation",
    "SpecViolationError",
    "Violation",
    "load_spec",
    "operation_for",
    "spec_dir",
    "validate_request",
]
