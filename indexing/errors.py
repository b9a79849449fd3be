"""The project's exception hierarchy, rooted at :class:`FusionRankError`.

OpenSearch, SQL and model-loading failures are mapped onto these types so that callers catch one
family of errors and read a message that names the cause.
"""

from __future__ import annotations


class FusionRankError(Exception):
    """Root of every error fusionrank raises on purpose."""


class ConfigError(FusionRankError):
    """A setting or argument is invalid (unknown name, bad value, missing file)."""


class UnknownNameError(ConfigError, KeyError):
    """A registered part (engine, encoder, fusion strategy, reranker...) was asked for by an unknown name."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid) or '(none registered)'}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class MissingDependencyError(ConfigError, ImportError):
    """A heavy optional dependency is not installed; the message names the extra/package to install."""


class MappingError(ConfigError):
    """An index mapping is malformed or disagrees with the configured encoders (e.g. vector dimension)."""


class EngineError(FusionRankError):
    """A search engine refused or failed a request."""


class EngineUnavailableError(EngineError):
    """The search engine cannot be reached (connection refused, timeout, DNS)."""


class EngineRequestError(EngineError):
    """The engine refused the request itself (HTTP 400): a malformed body or a parameter it does not accept."""


class EngineAccessError(EngineError):
    """The engine refused who is asking: the credentials (:class:`EngineAuthenticationError`) or their rights
    (:class:`EngineAuthorizationError`)."""


class EngineAuthenticationError(EngineAccessError):
    """HTTP 401: no credentials or wrong ones (check FUSIONRANK_OPENSEARCH_USER / _PASSWORD)."""


class EngineAuthorizationError(EngineAccessError):
    """HTTP 403: the credentials are known but lack a permission for this index or action."""


class EngineConflictError(EngineError):
    """HTTP 409: a version conflict (the document or index changed meanwhile)."""


class IndexNotFoundError(EngineError):
    """The index or alias does not exist."""


class IndexExistsError(EngineError):
    """An index of that name exists already."""


class BulkError(EngineError):
    """A bulk request failed as a whole (per-item rejections are reported in the bulk result instead)."""


class DimensionError(FusionRankError, ValueError):
    """A vector has the wrong dimension for its field or model."""


class CatalogError(FusionRankError):
    """A catalog file cannot be read at all (per-row problems become error records instead)."""


class EncoderError(FusionRankError):
    """An encoder could not be loaded or failed on an input."""


class HistoryError(FusionRankError):
    """The user-history store failed (SQL errors are mapped onto this)."""


class NotMigratedError(HistoryError):
    """The SQL database has not been migrated to the schema this version needs."""


class ModelArtifactError(FusionRankError):
    """A model artifact is missing, corrupt, or incompatible with the index mapping."""


class ImageError(EncoderError):
    """One product image cannot be used: missing, outside the images root, unreachable, not an image,
    corrupt or truncated, too large (bytes) or a decompression bomb (pixels). Per-item: the job goes on."""
