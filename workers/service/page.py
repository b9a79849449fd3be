"""The search page served by the service: ``GET /`` and ``GET /static/{file}``, and the two small JSON/bytes
endpoints it needs besides ``POST /search``: ``GET /v1/users`` and ``GET /v1/products/{product_id}/image``.

The page itself is static (plain JavaScript, no build step, no external resources: ``static/``) and needs no
key to load; it asks for the API key, keeps it in the browser's ``localStorage`` and sends it as
``X-API-Key`` on every call. Product photos are fetched with that header and shown through blob URLs.

* ``GET /v1/users?limit=50`` (key) -> ``{"users": [{"user_id", "events"}]}``: the users of the history
  store with the most events first (ties by id); ``[]`` when the service runs without a history store.
* ``GET /v1/products/{product_id}/image`` (key) -> the photo bytes of the product's ``image`` field (a
  path relative to ``ServiceState.images_root``). A path that leaves the root (``..``, an absolute path,
  a symbolic link pointing outside) is refused (403); only image files are served. 404 when the product,
  its image or the images root is missing, or when the image is a URL (the page loads those directly).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response

from indexing import fields as F
from indexing.errors import EngineError, HistoryError
from workers.service.auth import require_key

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The one file ``GET /`` serves.
INDEX_FILE = "index.html"
#: Suffixes of the product photos the image endpoint serves (anything else under the root is refused).
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif"}
MAX_USERS = 1000

#: The page loads nothing from elsewhere except product photos given as http(s) URLs.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data: https: http:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}

router = APIRouter()


def _state(request: Request) -> Any:
    return request.app.state.fusionrank


def _ready_state(request: Request) -> Any:
    state = _state(request)
    if not state.ready:
        raise HTTPException(503, "the service is still loading its model and index; retry when /readyz says ready")
    return state


def _static_files() -> dict[str, Path]:
    """The servable static files by name: plain files directly inside ``static/`` with a known type."""
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix.lower() in _STATIC_TYPES}


def _static_response(path: Path) -> Response:
    return Response(
        content=path.read_bytes(),
        media_type=_STATIC_TYPES[path.suffix.lower()],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": _CSP,
                 "Referrer-Policy": "no-referrer"},
    )


@router.get("/", include_in_schema=False)
def index_page() -> Response:
    """The search page (no key needed: it asks for one)."""
    path = _static_files().get(INDEX_FILE)
    if path is None:  # pragma: no cover - the package ships it
        raise HTTPException(404, f"the search page ({STATIC_DIR / INDEX_FILE}) is missing from this installation")
    return _static_response(path)


@router.get("/static/{file}", include_in_schema=False)
def static_file(file: str) -> Response:
    """One of the page's files; only plain files directly inside ``workers/service/static/``."""
    path = _static_files().get(file)
    if path is None:
        raise HTTPException(404, f"no static file {file!r}")
    return _static_response(path)


@router.get("/v1/users", dependencies=[Depends(require_key)], tags=["page"])
def list_users(request: Request, limit: int = Query(50, ge=1, le=MAX_USERS, description="most users returned")) -> dict[str, Any]:
    """Users of the history store with their event counts, most events first (for the shopper picker)."""
    store = _ready_state(request).history_store
    if store is None:
        return {"users": []}
    try:
        rows = users_by_events(store, limit)
    except HistoryError as e:
        log.warning("listing users failed: %s", e)
        raise HTTPException(503, f"the history store is unavailable: {e}") from None
    return {"users": [{"user_id": u, "events": n} for u, n in rows]}


def users_by_events(store: Any, limit: int) -> list[tuple[str, int]]:
    """``(user_id, event count)`` of the ``limit`` users with the most events (ties by id), from a
    :class:`rerank.history.HistoryStore` (its engine, its error mapping and its ORM models)."""
    from sqlalchemy import func, select

    from rerank.history.models import Event
    from rerank.history.store import sql_errors

    n = func.count().label("n")
    stmt = select(Event.user_id, n).group_by(Event.user_id).order_by(n.desc(), Event.user_id).limit(int(limit))
    with sql_errors(f"listing the {limit} most active users", store.url), store.engine.connect() as conn:
        return [(str(u), int(c)) for u, c in conn.execute(stmt).all()]


@router.get("/v1/products/{product_id}/image", dependencies=[Depends(require_key)], tags=["page"],
            responses={200: {"content": {t: {} for t in sorted(set(IMAGE_TYPES.values()))}}})
def product_image(product_id: str, request: Request) -> Response:
    """The product's photo, read from the images root (never from outside it)."""
    state = _ready_state(request)
    try:
        docs = state.engine.get(state.index, [product_id], fields=[F.ID, F.IMAGE])
    except EngineError as e:
        log.warning("reading product %r for its image failed: %s", product_id, e)
        raise HTTPException(503, f"the search engine is unavailable: {e}") from None
    doc = docs.get(product_id)
    if doc is None:
        raise HTTPException(404, f"no product {product_id!r} in index {state.index!r}")
    ref = doc.get(F.IMAGE)
    if not isinstance(ref, str) or not ref.strip():
        raise HTTPException(404, f"product {product_id!r} has no image")
    if ref.startswith(("http://", "https://")):
        raise HTTPException(404, f"product {product_id!r} has an image URL, not a file: load it from its URL")
    root = getattr(state, "images_root", None)
    if root is None:
        raise HTTPException(404, "no images root is configured: this service serves no product photos")
    path = resolve_under(Path(root), ref)
    if path is None:
        log.warning("refused image path %r of product %r: it leaves the images root", ref, product_id)
        raise HTTPException(403, f"the image path of product {product_id!r} leaves the images root; refused")
    media = IMAGE_TYPES.get(path.suffix.lower())
    if media is None:
        raise HTTPException(403, f"the image of product {product_id!r} is not an image file ({path.suffix or 'no suffix'}); refused")
    if not path.is_file():
        raise HTTPException(404, f"the image file of product {product_id!r} is missing")
    return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})


def resolve_under(root: Path, ref: str) -> Path | None:
    """``root / ref`` with every link and ``..`` resolved, or ``None`` when that is not inside ``root``."""
    base = root.resolve()
    try:
        path = (base / ref).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return None
    return path if path.is_relative_to(base) and path != base else None


__all__ = ["router", "resolve_under", "users_by_events"]
