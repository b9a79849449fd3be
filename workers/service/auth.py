"""API-key auth: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` (what OpenSearch ML Commons' Cohere
connector sends). Keys are ``settings.api_key`` / ``settings.admin_api_key``; compared in constant time;
never logged or echoed. ``require_key`` accepts the API key or the admin key; ``require_admin_key`` only
the admin key. With auth disabled (``fusionrank serve --no-auth``) both let every request through.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import HTTPException, Request

log = logging.getLogger(__name__)

HEADER_HINT = "send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'"


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def _matches(given: str, secret) -> bool:
    if secret is None:
        return False
    want = secret.get_secret_value()
    return bool(want) and hmac.compare_digest(given.encode("utf-8"), want.encode("utf-8"))


def _state(request: Request):
    return request.app.state.fusionrank


def _given_key(request: Request, what: str) -> str | None:
    """The presented key; None when auth is disabled; 401 naming ``what`` when no key was sent."""
    if not _state(request).auth_enabled:
        return None
    given = presented_key(request)
    if given is None:
        _log_refusal(request, f"no {what}")
        raise HTTPException(401, f"missing {what}: {HEADER_HINT}", headers={"WWW-Authenticate": "Bearer"})
    return given


def _log_refusal(request: Request, what: str) -> None:
    """One warning per refused request, naming the caller and what was wrong, never the key (e.g. a search pipeline
    configured with a wrong ``api_key``: the cluster fails open, and this line is where the service says why)."""
    client = request.client.host if request.client else "?"
    log.warning("refused %s %s from %s: %s (the key itself is not logged)", request.method, request.url.path, client, what)


# Both checks are ``async def`` FastAPI dependencies: they run on the event loop (header lookups and constant-time
# compares, microseconds) instead of a hop to the thread pool and back on every request.
async def require_key(request: Request) -> None:
    given = _given_key(request, "API key")
    if given is None:
        return
    s = _state(request).settings
    ok = _matches(given, s.api_key) | _matches(given, s.admin_api_key)  # both compared: no early exit
    if not ok:
        _log_refusal(request, "an invalid API key")
        raise HTTPException(401, "invalid API key (X-API-Key or Authorization: Bearer)", headers={"WWW-Authenticate": "Bearer"})


async def require_admin_key(request: Request) -> None:
    given = _given_key(request, "admin API key")
    if given is None:
        return
    st = _state(request)
    admin = st.settings.admin_api_key
    if admin is None or not admin.get_secret_value():
        _matches(given, st.settings.api_key)
        raise HTTPException(403, "admin endpoints are disabled: no admin key configured (FUSIONRANK_ADMIN_API_KEY)")
    if not _matches(given, admin):
        _log_refusal(request, "a key that is not the admin key")
        raise HTTPException(401, "invalid admin API key: this endpoint needs the admin key (X-API-Key or Authorization: Bearer)",
                            headers={"WWW-Authenticate": "Bearer"})


__all__ = ["presented_key", "require_admin_key", "require_key"]
