"""From an index mapping to a tantivy schema, and from a source document to what LocalEngine stores.

Pure functions and frozen dataclasses: :func:`parse_mapping` reads the ``mappings.properties`` of a
body made by :func:`mappings.load_mapping` into :class:`FieldSpec` s, :func:`build_schema` turns those
into a tantivy schema, and :func:`prepare_document` validates one document against the mapping
(``dynamic: strict``: unknown fields are rejected) and splits it into the tantivy document, the
stored JSON source and the vectors. A rejected document raises :class:`ItemError` with the reason
OpenSearch would give, which the bulk loop records for that item alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Literal, Mapping

import numpy as np

from indexing.errors import ConfigError, MappingError

#: internal tantivy fields (document id, write sequence number, stored JSON source)
ID_FIELD = "_id"
SEQ_FIELD = "_seq"
SOURCE_FIELD = "_source"
RESERVED = frozenset({ID_FIELD, SEQ_FIELD, SOURCE_FIELD, "_routing", "_index", "_score"})

Kind = Literal["text", "keyword", "float", "integer", "boolean", "date", "vector"]

FLOAT_TYPES = frozenset({"float", "double", "half_float", "scaled_float"})
INTEGER_TYPES = frozenset({"integer", "long", "short", "byte", "unsigned_long"})
#: OpenSearch analyzer name -> tantivy tokenizer registered by default
ANALYZERS = {"english": "en_stem", "standard": "default", "simple": "default", "default": "default", "whitespace": "whitespace", "keyword": "raw"}
SPACE_TYPES = ("innerproduct", "cosinesimil", "l2")
MAX_TOKEN_LEN = 40  # tantivy's default/en_stem analyzers drop longer tokens (RemoveLongFilter(40))


class ItemError(ValueError):
    """One bulk item cannot be written; ``reason`` is recorded with its id and the batch goes on."""


@dataclass(frozen=True)
class FieldSpec:
    """One mapped field (``title``, or a sub-field such as ``title.raw``) and how LocalEngine stores it."""

    name: str  # name in the mapping / documents / filters (dotted for sub-fields)
    kind: Kind
    tantivy_name: str | None  # None: kept in the source only (``index: false``) or a vector
    tokenizer: str | None = None  # text fields
    ignore_above: int | None = None  # keyword fields
    dim: int | None = None  # vectors
    space_type: str = "innerproduct"  # vectors
    hnsw_m: int = 16
    hnsw_ef_construction: int = 128
    parent: str | None = None  # sub-fields take their value from this field


@dataclass(frozen=True)
class IndexSpec:
    """Everything LocalEngine derives from one mapping body."""

    fields: Mapping[str, FieldSpec]  # by name, sub-fields included
    dynamic: str  # "strict" rejects unknown fields; "false"/"true" keep them in the source only
    ef_search: int = 100
    #: seconds after which readers pick up new commits by themselves (``index.refresh_interval``); None: only on refresh()
    refresh_interval_s: float | None = 1.0
    #: top-level field name -> (the field, its sub-fields...): what one source value is written to
    targets: Mapping[str, tuple[FieldSpec, ...]] = field(default_factory=dict)

    @property
    def top_level(self) -> dict[str, FieldSpec]:
        return {n: s for n, s in self.fields.items() if s.parent is None}

    def vectors(self) -> dict[str, FieldSpec]:
        return {n: s for n, s in self.fields.items() if s.kind == "vector"}

    def text_fields(self) -> dict[str, FieldSpec]:
        return {n: s for n, s in self.fields.items() if s.kind == "text" and s.tantivy_name}

    def filterable(self) -> list[str]:
        return sorted(n for n, s in self.fields.items() if s.tantivy_name and s.kind != "text")

    def subfields_of(self, name: str) -> list[FieldSpec]:
        return [s for s in self.fields.values() if s.parent == name]


# --------------------------------------------------------------------------- mapping -> spec
def _tantivy_name(name: str) -> str:
    return name.replace(".", "__")


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise MappingError(f"{what} must be a positive integer, got {v!r}")
    return v


def _leaf_spec(name: str, spec: Mapping[str, Any], parent: str | None) -> FieldSpec:
    if not isinstance(spec, Mapping):
        raise MappingError(f"field {name!r}: the mapping of a field must be an object, got {type(spec).__name__}")
    ftype = spec.get("type")
    if ftype is None:
        if "properties" in spec:
            raise MappingError(f"field {name!r}: object fields are not supported by LocalEngine (flatten the field)")
        raise MappingError(f"field {name!r} has no 'type'")
    indexed = spec.get("index", True) is not False
    tname = _tantivy_name(name) if indexed else None
    if ftype == "text":
        analyzer = spec.get("analyzer", "standard")
        if analyzer not in ANALYZERS:
            raise MappingError(
                f"field {name!r}: analyzer {analyzer!r} is not supported by LocalEngine; supported: {', '.join(sorted(ANALYZERS))}"
            )
        return FieldSpec(name, "text", tname, tokenizer=ANALYZERS[analyzer], parent=parent)
    if ftype == "keyword":
        ia = spec.get("ignore_above")
        if ia is not None:
            ia = _positive_int(ia, f"field {name!r}: ignore_above")
        return FieldSpec(name, "keyword", tname, ignore_above=ia, parent=parent)
    if ftype in FLOAT_TYPES:
        return FieldSpec(name, "float", tname, parent=parent)
    if ftype in INTEGER_TYPES:
        return FieldSpec(name, "integer", tname, parent=parent)
    if ftype == "date":
        return FieldSpec(name, "date", tname, parent=parent)
    if ftype == "boolean":
        return FieldSpec(name, "boolean", tname, parent=parent)
    if ftype == "knn_vector":
        if parent is not None:
            raise MappingError(f"field {name!r}: a knn_vector cannot be a sub-field")
        dim = _positive_int(spec.get("dimension"), f"knn_vector field {name!r}: dimension")
        method = spec.get("method") or {}
        if not isinstance(method, Mapping):
            raise MappingError(f"knn_vector field {name!r}: 'method' must be an object")
        space = method.get("space_type", spec.get("space_type", "l2"))
        if space not in SPACE_TYPES:
            raise MappingError(f"knn_vector field {name!r}: space_type {space!r} is not supported; valid: {', '.join(SPACE_TYPES)}")
        params = method.get("parameters") or {}
        m = _positive_int(params.get("m", 16), f"knn_vector field {name!r}: parameters.m")
        efc = _positive_int(params.get("ef_construction", 128), f"knn_vector field {name!r}: parameters.ef_construction")
        return FieldSpec(name, "vector", None, dim=dim, space_type=space, hnsw_m=m, hnsw_ef_construction=efc)
    raise MappingError(
        f"field {name!r}: type {ftype!r} is not supported by LocalEngine; supported: text, keyword, "
        f"{', '.join(sorted(FLOAT_TYPES | INTEGER_TYPES))}, date, boolean, knn_vector"
    )


def parse_mapping(body: Mapping[str, Any]) -> IndexSpec:
    """Read an index body (``{"settings": ..., "mappings": {"properties": ...}}``) into an :class:`IndexSpec`."""
    if not isinstance(body, Mapping):
        raise MappingError(f"an index body must be an object, got {type(body).__name__}")
    mp = body.get("mappings")
    if not isinstance(mp, Mapping) or not isinstance(mp.get("properties"), Mapping) or not mp["properties"]:
        raise MappingError("the index body has no 'mappings.properties' object with at least one field")
    dynamic = str(mp.get("dynamic", "true")).lower()
    if dynamic not in ("strict", "true", "false"):
        raise MappingError(f"mappings.dynamic must be strict, true or false, got {mp.get('dynamic')!r}")
    fields: dict[str, FieldSpec] = {}
    for name, spec in mp["properties"].items():
        if not isinstance(name, str) or not name or name in RESERVED or name.startswith("_") or "." in name:
            raise MappingError(f"field name {name!r} is not allowed (empty, dotted, or starting with '_')")
        fields[name] = _leaf_spec(name, spec, None)
        for sub, sspec in (spec.get("fields") or {}).items():
            full = f"{name}.{sub}"
            fields[full] = _leaf_spec(full, sspec, name)
    tnames = [s.tantivy_name for s in fields.values() if s.tantivy_name]
    dup = {t for t in tnames if tnames.count(t) > 1}
    if dup:
        raise MappingError(f"field names collide in the LocalEngine schema: {sorted(dup)}")
    settings = body.get("settings") or {}
    index_settings = settings.get("index", settings) if isinstance(settings, Mapping) else {}
    raw = index_settings.get("knn.algo_param.ef_search", 100) if isinstance(index_settings, Mapping) else 100
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).isdigit() or int(raw) <= 0:
        raise MappingError(f"settings index.knn.algo_param.ef_search must be a positive integer, got {raw!r}")
    ef = int(raw)
    interval = parse_interval(index_settings.get("refresh_interval", "1s") if isinstance(index_settings, Mapping) else "1s")
    targets = {
        n: (f, *(sub for sub in fields.values() if sub.parent == n)) for n, f in fields.items() if f.parent is None
    }
    return IndexSpec(fields=fields, dynamic=dynamic, ef_search=ef, refresh_interval_s=interval, targets=targets)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_interval(v: Any) -> float | None:
    """OpenSearch's ``refresh_interval`` (``"1s"``, ``"500ms"``, ``"-1"`` = never) in seconds, None for never."""
    text = str(v).strip()
    if text in ("-1", "null", "None"):
        return None
    for unit in ("ms", "s", "m", "h"):
        num = text[: -len(unit)]
        if text.endswith(unit) and num.replace(".", "", 1).isdigit():
            return float(num) * _UNITS[unit]
    raise MappingError(f"settings index.refresh_interval must be a time such as '1s' or '500ms', or -1, got {v!r}")


def build_schema(spec: IndexSpec):
    """The tantivy schema for ``spec``: text with the mapping's analyzer, keywords raw, numbers fast+indexed."""
    import tantivy

    sb = tantivy.SchemaBuilder()
    sb.add_text_field(ID_FIELD, stored=False, tokenizer_name="raw", index_option="basic", fast=True)
    sb.add_unsigned_field(SEQ_FIELD, stored=False, indexed=True, fast=True)
    sb.add_bytes_field(SOURCE_FIELD, stored=True, indexed=False)
    for s in spec.fields.values():
        if s.tantivy_name is None:
            continue
        if s.kind == "text":
            sb.add_text_field(s.tantivy_name, stored=False, tokenizer_name=s.tokenizer, index_option="freq")
        elif s.kind == "keyword":
            sb.add_text_field(s.tantivy_name, stored=False, tokenizer_name="raw", index_option="basic")
        elif s.kind in ("float", "date"):
            sb.add_float_field(s.tantivy_name, stored=False, indexed=True, fast=True)
        elif s.kind == "integer":
            sb.add_integer_field(s.tantivy_name, stored=False, indexed=True, fast=True)
        elif s.kind == "boolean":
            sb.add_boolean_field(s.tantivy_name, stored=False, indexed=True, fast=True)
    return sb.build()


# --------------------------------------------------------------------------- query analysis
class QueryAnalyzer:
    """Turns free text into the terms a text field was indexed with (same tokenizer, lowercase, stemmer).

    Used instead of a query parser, so user input such as ``$ hole saw``, ``1/2" pipe`` or ``AND (``
    is only ever a list of terms and can never raise a syntax error.
    """

    def __init__(self) -> None:
        import tantivy

        T, Fl = tantivy.Tokenizer, tantivy.Filter
        self._analyzers = {
            "en_stem": tantivy.TextAnalyzerBuilder(T.simple()).filter(Fl.remove_long(MAX_TOKEN_LEN)).filter(Fl.lowercase()).filter(Fl.stemmer("english")).build(),
            "default": tantivy.TextAnalyzerBuilder(T.simple()).filter(Fl.remove_long(MAX_TOKEN_LEN)).filter(Fl.lowercase()).build(),
            "whitespace": tantivy.TextAnalyzerBuilder(T.whitespace()).build(),
        }

    def terms(self, text: str, tokenizer: str) -> list[str]:
        if tokenizer == "raw":
            return [text] if text else []
        return list(self._analyzers[tokenizer].analyze(text))


# --------------------------------------------------------------------------- documents
@dataclass(frozen=True)
class PreparedDoc:
    """A validated document: tantivy field values, the JSON source (vectors excluded) and the vectors."""

    values: tuple[tuple[FieldSpec, Any], ...]  # (field, converted value) pairs for tantivy
    source_json: bytes
    vectors: Mapping[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return len(self.source_json) + sum(v.nbytes for v in self.vectors.values())


def _parse_float(s: FieldSpec, v: Any) -> float:
    if isinstance(v, bool):
        raise ItemError(f"mapper_parsing_exception: failed to parse field [{s.name}] of type [{s.kind}]: {v!r} is not a number")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ItemError(f"mapper_parsing_exception: failed to parse field [{s.name}] of type [{s.kind}]: {v!r} is not a number") from None
    if not math.isfinite(f):
        raise ItemError(f"mapper_parsing_exception: field [{s.name}] cannot be NaN or infinite")
    return f


def _parse_date(s: FieldSpec, v: Any) -> float:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise ItemError(f"mapper_parsing_exception: failed to parse date field [{s.name}] with value {v!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    return _parse_float(s, v)


def _parse_bool(s: FieldSpec, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v in ("true", "false"):
        return v == "true"
    raise ItemError(f"mapper_parsing_exception: failed to parse field [{s.name}] of type [boolean]: {v!r} (use true or false)")


def _convert(s: FieldSpec, v: Any) -> Any | None:
    """The tantivy value of one scalar ``v`` for field ``s`` (None: not indexed, e.g. over ignore_above)."""
    if s.kind == "text":
        return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    if s.kind == "keyword":
        if isinstance(v, (dict, list)):
            raise ItemError(f"mapper_parsing_exception: field [{s.name}] of type [keyword] cannot hold an object")
        text = ("true" if v else "false") if isinstance(v, bool) else str(v)
        return None if s.ignore_above is not None and len(text) > s.ignore_above else text
    if s.kind == "float":
        return _parse_float(s, v)
    if s.kind == "date":
        return _parse_date(s, v)
    if s.kind == "integer":
        f = _parse_float(s, v)
        if abs(f) >= 2**63:
            raise ItemError(f"mapper_parsing_exception: value {v!r} of field [{s.name}] is out of range for an integer")
        return int(f)  # OpenSearch coerces 2.7 -> 2 for integer fields
    if s.kind == "boolean":
        return _parse_bool(s, v)
    raise AssertionError(s.kind)  # pragma: no cover


def parse_vector(s: FieldSpec, v: Any) -> np.ndarray:
    try:
        a = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError):
        raise ItemError(f"mapper_parsing_exception: field [{s.name}] must be an array of {s.dim} numbers") from None
    if a.ndim != 1:
        raise ItemError(f"mapper_parsing_exception: field [{s.name}] must be a flat array of {s.dim} numbers, got shape {a.shape}")
    if a.shape[0] != s.dim:
        raise ItemError(f"mapper_parsing_exception: Vector dimension mismatch for field [{s.name}]. Expected: {s.dim}, Given: {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ItemError(f"mapper_parsing_exception: field [{s.name}] contains NaN or infinity")
    if s.space_type == "cosinesimil" and not np.any(a):
        raise ItemError(f"mapper_parsing_exception: zero vector is not supported for space type cosinesimil in field [{s.name}]")
    return a


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def prepare_document(spec: IndexSpec, doc: Any) -> PreparedDoc:
    """Validate ``doc`` against the mapping and split it; raises :class:`ItemError` with the reason."""
    if not isinstance(doc, Mapping):
        raise ItemError(f"mapper_parsing_exception: a document must be an object, got {type(doc).__name__}")
    targets_of = spec.targets
    values: list[tuple[FieldSpec, Any]] = []
    vectors: dict[str, np.ndarray] = {}
    source: dict[str, Any] = {}
    for name, v in doc.items():
        targets = targets_of.get(name) if isinstance(name, str) else None
        if targets is None:
            if spec.dynamic == "strict":
                raise ItemError(
                    f"strict_dynamic_mapping_exception: mapping set to strict, dynamic introduction of [{name}] within [_doc] is not allowed"
                )
            source[name] = v  # dynamic false/true: kept in the source, not indexed
            continue
        s = targets[0]
        if v is None:
            source[name] = None
            continue
        if s.kind == "vector":
            vectors[name] = parse_vector(s, v)
            continue
        source[name] = v
        for item in (v if isinstance(v, (list, tuple)) else (v,)):
            if item is None:
                continue
            for t in targets:
                if t.tantivy_name is None:
                    if t is s and t.kind != "text":
                        _convert(t, item)  # still validated, as OpenSearch parses unindexed values
                    continue
                if type(item) is str and (t.kind == "text" or (t.kind == "keyword" and (t.ignore_above is None or len(item) <= t.ignore_above))):
                    values.append((t, item))  # the common case, without a conversion call
                    continue
                cv = _convert(t, item)
                if cv is not None:
                    values.append((t, cv))
    try:
        src = json.dumps(source, ensure_ascii=False, separators=(",", ":"), default=_jsonable).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ItemError(f"mapper_parsing_exception: the document cannot be serialized as JSON: {e}") from None
    return PreparedDoc(tuple(values), src, vectors)


def to_tantivy(prepared: PreparedDoc, doc_id: str, seq: int):
    import tantivy

    d = tantivy.Document()
    d.add_text(ID_FIELD, doc_id)
    d.add_unsigned(SEQ_FIELD, seq)
    d.add_bytes(SOURCE_FIELD, prepared.source_json)
    for s, v in prepared.values:
        k = s.kind
        if k in ("text", "keyword"):
            d.add_text(s.tantivy_name, v)
        elif k in ("float", "date"):
            d.add_float(s.tantivy_name, v)
        elif k == "integer":
            d.add_integer(s.tantivy_name, v)
        else:
            d.add_boolean(s.tantivy_name, v)
    return d


# --------------------------------------------------------------------------- filters
def filter_value(s: FieldSpec, v: Any) -> Any:
    """A term-filter value converted to the field's type (ConfigError when it cannot be)."""
    try:
        return _convert(s, v)
    except ItemError as e:
        raise ConfigError(f"term filter on {s.name!r}: {str(e).split(': ', 1)[-1]}") from None


def integer_bounds(lower: tuple[float, bool] | None, upper: tuple[float, bool] | None) -> tuple[int | None, int | None]:
    """Inclusive integer bounds for a range given as (value, inclusive) pairs."""
    lo = hi = None
    if lower is not None:
        v, inc = lower
        lo = math.ceil(v) if inc else math.floor(v) + 1
    if upper is not None:
        v, inc = upper
        hi = math.floor(v) if inc else math.ceil(v) - 1
    return lo, hi


def tightest(bounds: Iterable[tuple[float, bool]], lower: bool) -> tuple[float, bool] | None:
    """The strictest of several (value, inclusive) bounds; exclusive wins a tie."""
    best: tuple[float, bool] | None = None
    for v, inc in bounds:
        if best is None:
            best = (v, inc)
            continue
        if (v > best[0]) if lower else (v < best[0]):
            best = (v, inc)
        elif v == best[0] and not inc:
            best = (v, False)
    return best
