"""Typed settings, read once at the process edge (env prefix ``FUSIONRANK_``). Library code takes arguments.

Secrets (passwords, API keys, credentials inside URLs) are ``SecretStr`` or redacted by
:meth:`Settings.redacted` before anything is printed or logged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from indexing.errors import ConfigError
from mappings import DEFAULT_MAPPING

REPO_ROOT = Path(__file__).resolve().parent.parent
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/]*):(?P<pw>[^@/]*)@")
REDACTED = "**********"


def redact_url(url: str | None) -> str | None:
    """``redis://:secret@host`` -> ``redis://:**********@host`` (user names stay, passwords go)."""
    if url is None:
        return None
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", url)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fusionrank"


def default_shared_data() -> Path | None:
    """``../shared/data`` beside the working directory or beside the repository, when it exists."""
    for cand in (Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


class Settings(BaseSettings):
    """Effective configuration of one fusionrank process."""

    model_config = SettingsConfigDict(env_prefix="FUSIONRANK_", extra="ignore", validate_default=True)

    # search engine
    engine: str = Field("local", description="search engine: local (embedded) | opensearch")
    opensearch_url: str = "http://localhost:9200"
    opensearch_user: str | None = None
    opensearch_password: SecretStr | None = None
    opensearch_verify_certs: bool = True
    opensearch_ca_certs: Path | None = None
    opensearch_timeout_s: float = 10.0
    index_alias: str = "products"
    mapping: str = DEFAULT_MAPPING
    hnsw_engine: Literal["faiss", "lucene"] = "faiss"

    # storage
    data_dir: Path = Field(default_factory=default_data_dir)
    shared_data: Path | None = Field(default_factory=default_shared_data, description="folder holding fashion/ and homedepot/")
    sql_url: str | None = Field(None, description="SQLAlchemy URL of the history store; default: SQLite file in data_dir")

    # workers
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    broker_visibility_timeout_s: int = Field(3600, ge=1, description="Redis broker: seconds before an unacknowledged task is redelivered")

    # models
    text_model: str = "minilm"
    text_backend: Literal["torch", "onnx-int8", "onnx-q8"] = "torch"
    query_text_backend: Literal["auto", "torch", "onnx-int8", "onnx-q8"] | None = Field(
        "auto", description="backend that encodes queries in the rerank call; one other than text_backend must agree with "
                            "it on probe texts (cosine >= 0.995), checked at start-up. auto: onnx-q8 on the CPU when it agrees "
                            "and is faster there, else text_backend; None: text_backend")
    image_model: str = "efficientnet_lite0"
    attribute_model_dir: Path | None = Field(None, description="photo attribute model (`fusionrank attributes train --out DIR`): "
                                               "indexing into a products-v4 index predicts each photo's colour, article type, gender "
                                               "and usage with it and completes missing catalog values")
    attribute_completion_threshold: float = Field(0.8, gt=0, le=1, description="confidence from which a photo's predicted "
                                                  "attribute completes a missing catalog value (marked in completed_attributes)")
    image_url_allow_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="networks (CIDR, e.g. 10.20.0.0/16; a bare address is its own /32) that catalog "
                                          "image URLs may lead to besides public addresses: a shop's own image host. "
                                          "Outside them a loopback, private, link-local or cloud-metadata address (directly, "
                                          "through DNS or a redirect) is refused. JSON list or comma-separated")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_dir: Path | None = Field(None, description="fusion model artifact the rerank call serves; default: data_dir/models/current (written by `fusionrank demo`)")
    rerank_budget_ms: float = Field(50.0, gt=0, description="time budget of one rerank call before it fails open to the first-stage order")
    model_runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="what runs the fusion ranker's forward pass in the rerank call: onnx (exported at start-up, checked "
                            "against torch), torch, or auto (onnx on the CPU, torch on a GPU; torch when the export fails)")
    diversity: float | Literal["auto"] = Field(
        0.0, description="default lambda of the rerank call's diversity step (MMR over text and aligned photo vectors) for the "
                         "served index: a number in [0, 1] (0: off, the model's order) or auto (strong for a vague query from a "
                         "shopper without history, weak when the query names attributes or the history is strong); a call's "
                         "own diversity overrides it")
    diversity_by_index: dict[str, float | Literal["auto"]] = Field(
        default_factory=dict, description='per-index defaults over `diversity`, JSON: {"products": "auto", "products-b": 0.2}')
    diversity_text_weight: float = Field(0.5, ge=0, description="weight of the text-vector cosine in the diversity step's similarity")
    diversity_image_weight: float = Field(0.5, ge=0, description="weight of the aligned-photo cosine in the diversity step's similarity")
    diversity_colour_weight: float = Field(0.75, ge=0, description="weight of the photos' pixel colour descriptors (image_colour, where "
                                                                  "fetched for the model's colour head) in the diversity step's similarity")
    diversity_colour_name_weight: float = Field(2.0, ge=0, description="weight of the products' colour names agreeing (the catalog's "
                                                "colour, or the one indexing completed from the photo) in the diversity step's similarity")
    diversity_auto_max: float = Field(0.9, ge=0, le=1, description="the lambda of diversity=auto for a vague query from a shopper without history")
    doc_cache_prefill: bool = Field(False, description="OpenSearch: read the index's documents (vectors and the fields the model "
                                    "reads) into the rerank call's document cache at start-up, up to its size (50,000), so that "
                                    "the first calls meeting a product do not fetch its vectors as JSON")
    aligned_cache_prefill: bool | None = Field(
        None, description="project the indexed photos into the reranker's aligned-photo cache at start-up (default: only "
                          "with the local engine, whose vectors are on disk; with OpenSearch it scrolls the index)")

    # the retraining loop (workers/retrain.py, the Celery task fusionrank.model.retrain)
    retrain_min_new_events: int = Field(10_000, ge=1, description="UBI events that must have arrived in the history store since "
                                        "the last retraining before the retrain task trains again (a forced run ignores it)")
    retrain_margin: float = Field(0.01, ge=0, le=1, description="NDCG@10 the candidate must gain over the serving model on the "
                                  "held-out log (and on qrels, when given) to be promoted")
    retrain_holdout: float = Field(0.2, gt=0, lt=1, description="share of the log's query texts that no retrained model learns "
                                   "from: the behaviour the candidate and the serving model are compared on")
    retrain_catalog: Path | None = Field(None, description="catalog file the retrain task indexes and trains against (default: "
                                         "the fashion benchmark's catalog in the shared data folder)")
    retrain_images_root: Path | None = Field(None, description="images root of retrain_catalog (default: its folder)")
    retrain_click_model: Literal["pbm", "sdbn", "ctr"] = Field("pbm", description="click model of the retrain task's judgments")
    retrain_max_minutes: float = Field(20.0, gt=0, description="time budget of the retrain task's training loop")
    retrain_check_interval_s: float = Field(3600.0, ge=0, description="celery beat: how often the retrain task checks for new "
                                            "behaviour (0: never scheduled, run it by hand)")

    # service
    ubi_record: bool = Field(True, description="the service records what /search and /rerank served (query id, positions) into the "
                             "history store's UBI tables, off the request path")
    explore_share: float = Field(0.0, ge=0, le=1, description="share of /search and /rerank answers that explore (rerank.explore): "
                                 "from explore_from_position on, products drawn from the model's ranks down to explore_depth, so "
                                 "that the log judges what the model ranks a little lower; chosen by a hash of the query id (0: never)")
    explore_from_position: int = Field(4, ge=1, description="first position (1-based) an exploring answer may fill with a drawn product")
    explore_depth: int = Field(50, ge=2, le=1000, description="the model's ranks an exploring answer draws from (weight 1/rank)")
    api_key: SecretStr | None = None
    admin_api_key: SecretStr | None = None
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest accepted HTTP request body (413 above)")
    max_candidates: int = Field(1000, ge=1, description="most documents/hits one rerank request may carry (422 above)")
    serve_max_concurrent: int | None = Field(
        None, ge=1, description="most reranker calls running at once in one `fusionrank serve` process; default: 1 for a CPU "
                                "model (scale with --workers), 32 for a micro-batched (CUDA) model")
    serve_switch_interval_ms: float = Field(
        1.0, ge=0.01, le=1000.0, description="the interpreter's thread switch interval in each `fusionrank serve` process, ms "
                                             "(Python's own default: 5)")
    # set by `fusionrank serve --workers N` for its worker processes (uvicorn starts them from the environment)
    serve_no_auth: bool = Field(False, description="set by `fusionrank serve --no-auth --workers N` for its worker processes")
    serve_images_root: Path | None = Field(None, description="set by `fusionrank serve --images-root DIR --workers N` for its worker processes")
    serve_balance_file: str | None = Field(None, description="set by `fusionrank serve --workers N`: the workers' shared connection table")
    serve_workers: int | None = Field(None, ge=1, description="set by `fusionrank serve --workers N`: how many worker processes share the port")

    # caches and tooling
    cache_dir: str | None = Field(None, description="where built onnx-q8 text models are kept between processes; off: nowhere; "
                                                    "default: $XDG_CACHE_HOME/fusionrank, else ~/.cache/fusionrank")

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        from indexing.engines import ENGINES

        if v not in ENGINES:
            raise ValueError(f"unknown engine {v!r}; valid engines: {', '.join(ENGINES.names())}")
        return v

    @field_validator("image_url_allow_networks", mode="before")
    @classmethod
    def _allow_networks(cls, v: Any) -> Any:
        from indexing.url_fetch import parse_networks

        if isinstance(v, str):
            if v.strip().startswith("["):
                import json

                try:
                    v = json.loads(v)
                except ValueError as e:
                    raise ValueError(f"not a JSON list of networks: {e}") from None
            else:
                v = [x for x in (p.strip() for p in v.split(",")) if x]
        if not isinstance(v, (list, tuple)):
            return v  # pydantic says what is wrong with it
        try:
            return [str(n) for n in parse_networks(v)]
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("diversity", mode="before")
    @classmethod
    def _diversity(cls, v: Any) -> Any:
        from rerank.diversity import parse_diversity

        try:
            return parse_diversity(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("diversity_by_index", mode="before")
    @classmethod
    def _diversity_by_index(cls, v: Any) -> Any:
        from rerank.diversity import parse_diversity

        if not isinstance(v, dict):
            return v  # pydantic says what is wrong with it
        try:
            return {str(k): parse_diversity(x, what=f"diversity of index {k!r}") for k, x in v.items()}
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _diversity_weights(self) -> "Settings":
        if self.diversity_text_weight + self.diversity_image_weight + self.diversity_colour_weight + self.diversity_colour_name_weight <= 0:
            raise ValueError("diversity_text_weight, diversity_image_weight, diversity_colour_weight and diversity_colour_name_weight "
                             "cannot all be 0")
        return self

    @model_validator(mode="after")
    def _explore(self) -> "Settings":
        try:  # rerank.explore.ExploreConfig checks its own bounds (depth at least from_position)
            self.explore_config()
        except ConfigError as e:
            raise ValueError(f"explore_depth ({self.explore_depth}) / explore_from_position ({self.explore_from_position}): {e}") from None
        return self

    def explore_config(self) -> Any:
        """The :class:`rerank.explore.ExploreConfig` of these settings."""
        from rerank.explore import ExploreConfig

        return ExploreConfig(share=self.explore_share, from_position=self.explore_from_position, depth=self.explore_depth)

    def diversity_for(self, index: str) -> float | str:
        """The default diversity of ``index``: its ``diversity_by_index`` entry, else ``diversity``."""
        return self.diversity_by_index.get(index, self.diversity)

    def diversity_config(self) -> Any:
        """The :class:`rerank.diversity.DiversityConfig` of these settings (similarity weights, ``auto``'s largest lambda)."""
        from rerank.diversity import DiversityConfig

        return DiversityConfig(text_weight=self.diversity_text_weight, image_weight=self.diversity_image_weight,
                               colour_weight=self.diversity_colour_weight, colour_name_weight=self.diversity_colour_name_weight,
                               auto_max=self.diversity_auto_max)

    @field_validator("index_alias")
    @classmethod
    def _alias_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,200}", v):
            raise ValueError(f"index alias {v!r} must be lowercase letters, digits, '_', '.', '-'")
        return v

    @property
    def effective_sql_url(self) -> str:
        return self.sql_url or f"sqlite:///{self.data_dir / 'history.sqlite3'}"

    @property
    def effective_model_dir(self) -> Path:
        return self.model_dir or self.data_dir / "models" / "current"

    @property
    def fashion_dir(self) -> Path | None:
        d = self.shared_data / "fashion" if self.shared_data else None
        return d if d and d.is_dir() else None

    def fashion_bench(self, catalog: Path | None = None, images_root: Path | None = None) -> tuple[Path, Path]:
        """``(catalog, images_root)``: the given ones, else the fashion benchmark in the shared data folder.

        A given catalog's images default to its own folder. ConfigError when there is neither.
        """
        if catalog is not None:
            return catalog, images_root or catalog.parent
        fashion = self.fashion_dir
        if fashion is None:
            raise ConfigError("no fashion data found: pass --catalog and --images-root or set FUSIONRANK_SHARED_DATA")
        return fashion / "bench" / "catalog.csv", images_root or fashion

    def retrain_inputs(self) -> tuple[Path, Path]:
        """``(catalog, images_root)`` the retrain task trains against; ConfigError when none is configured."""
        if self.retrain_catalog is not None:
            return self.retrain_catalog, self.retrain_images_root or self.retrain_catalog.parent
        fashion = self.fashion_dir
        if fashion is None:
            raise ConfigError("the retrain task needs a catalog: set FUSIONRANK_RETRAIN_CATALOG (and _RETRAIN_IMAGES_ROOT)")
        return fashion / "bench" / "catalog.csv", self.retrain_images_root or fashion

    def redacted(self) -> dict[str, Any]:
        """Every setting, JSON-friendly, with secrets and URL passwords replaced by ``**********``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            if isinstance(v, SecretStr):
                v = REDACTED if v.get_secret_value() else ""
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, str) and "://" in v:
                v = redact_url(v)
            out[name] = v
        out["effective_sql_url"] = redact_url(self.effective_sql_url)
        return out

    def __repr_args__(self):  # repr()/str() show the redacted values (URL passwords included)
        red = self.redacted()
        return [(k, red.get(k)) for k in type(self).model_fields]

    def opensearch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``OpenSearchEngine`` (secrets unwrapped only here)."""
        auth = None
        if self.opensearch_user:
            pw = self.opensearch_password.get_secret_value() if self.opensearch_password else ""
            auth = (self.opensearch_user, pw)
        return {
            "url": self.opensearch_url,
            "http_auth": auth,
            "verify_certs": self.opensearch_verify_certs,
            "ca_certs": str(self.opensearch_ca_certs) if self.opensearch_ca_certs else None,
            "timeout_s": self.opensearch_timeout_s,
        }


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (plus explicit overrides); invalid values raise ConfigError."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(f"invalid settings: {'; '.join(_describe(err) for err in e.errors())}") from None


_SECRET_FIELDS = {name for name, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)}


def _describe(err: Mapping[str, Any]) -> str:
    """One validation error named by its environment variable (``FUSIONRANK_SERVE_WORKERS: ... (got '0')``); the
    value is shown unless it is a secret (URL passwords redacted)."""
    loc = [str(p) for p in err.get("loc", ())]
    name = f"FUSIONRANK_{loc[0].upper()}" + "".join(f".{p}" for p in loc[1:]) if loc else "settings"
    got = ""
    if loc and loc[0] not in _SECRET_FIELDS and isinstance(err.get("input"), (str, int, float)) and not isinstance(err.get("input"), bool):
        shown = redact_url(str(err["input"])) if isinstance(err["input"], str) else err["input"]
        if repr(shown) not in err["msg"]:  # a validator's own message may name the value already
            got = f" (got {shown!r})"
    return f"{name}: {err['msg']}{got}"


def apply_process_settings(settings: Settings) -> None:
    """What the settings configure process-wide rather than per call: the cache directory of built ONNX models.
    Called once at each process edge (the CLI, every `fusionrank serve` worker)."""
    from indexing.onnx_runtime import configure_cache_dir

    configure_cache_dir(settings.cache_dir)
