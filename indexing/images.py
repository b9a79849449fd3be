"""Product images: resolve a catalog reference safely, read its bytes with limits, decode it fully.

A reference is either a path (relative to an images root, or absolute but inside it) or an
``http``/``https`` URL. Every failure raises :class:`~indexing.errors.ImageError` with a message that
names the cause, so that the bulk pipeline records it against the product and goes on:

- ``image not found``: the file does not exist;
- ``outside the images root``: ``../../etc/passwd``, an absolute path elsewhere, or a symlink that
  leads out of the root;
- ``unreachable``: a URL that cannot be fetched (no retries: a dead host must not stall a batch);
- ``refused``: a URL that leads to a loopback, private, link-local or cloud-metadata address, directly, through
  DNS or through a redirect (:class:`~indexing.errors.ImageRefusedError`; see :mod:`indexing.url_fetch`);
- ``too large``: more bytes than ``max_bytes``;
- ``decompression bomb``: more pixels than ``max_pixels`` (checked from the header, before decoding);
- ``not an image`` / ``corrupt or truncated``: the bytes do not decode completely, or are in a format
  outside :data:`ALLOWED_FORMATS` (no EPS/PostScript, which PIL would hand to Ghostscript, nor other
  rarely used decoders);
- ``not a regular file``: a directory, FIFO or device node (checked again on the opened descriptor, so
  a file replaced by a symlink or a FIFO after the check is not followed or waited on; O_NOFOLLOW guards
  the last path component only).

Paths are resolved once, in :func:`resolve_image_path` (``resolve()`` then ``is_relative_to`` the
resolved root), and opened only in :func:`fetch_image_bytes`. Decoding is bounded: the pixel count is
read from the header and refused above ``max_pixels`` before any pixel data is decompressed, so memory
stays under about ``max_pixels`` x 8 bytes (RGBA decode plus RGB copy) and PIL's own
``DecompressionBombWarning``/``Error`` also count as refusals; PNG text chunks are bounded by PIL
(``PngImagePlugin.MAX_TEXT_CHUNK``).

With ``images_root=None`` the current directory is the root.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from indexing.errors import ImageError
from indexing.url_fetch import DEFAULT_POLICY, URL_SCHEMES, UrlPolicy, fetch_url

log = logging.getLogger(__name__)

#: default pixel limit (width x height), checked from the image header before any decoding
DEFAULT_MAX_PIXELS = 40_000_000
#: default size limit of an image file or download, in bytes
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: default timeout of one URL fetch, in seconds (no retries)
DEFAULT_URL_TIMEOUT_S = 5.0
#: image formats PIL may decode (everything else is "not an image"); JPEG covers camera files PIL reads as MPO.
#: Only names of PIL open plugins that ship with Pillow (an unknown name makes ``Image.open`` fail).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def is_url(ref: str) -> bool:
    """True for references with a URL scheme (``http://...``); Windows drive letters are not schemes."""
    scheme = urlsplit(ref).scheme
    return len(scheme) > 1


def _root(images_root: Path | str | None) -> Path:
    return Path(os.path.abspath(images_root if images_root is not None else os.getcwd()))


def _lexical_target(ref: str, images_root: Path | str | None) -> tuple[Path, Path]:
    """``(root, target)`` without touching the disk: both absolute and normalized (``..`` folded)."""
    if not ref or not ref.strip():
        raise ImageError("empty image reference")
    if "\x00" in ref:
        raise ImageError(f"image path {ref!r} contains a NUL byte")
    root = _root(images_root)
    target = Path(os.path.normpath(os.path.join(root, ref)))  # join keeps an absolute ref as is
    if not target.is_relative_to(root):
        raise ImageError(f"image path {ref!r} is outside the images root {str(root)!r}; refused")
    if target == root:
        raise ImageError(f"image path {ref!r} names the images root itself, not a file")
    return root, target


def check_image_ref(ref: str, images_root: Path | str | None) -> None:
    """Validate the *form* of a reference without any I/O (used by the catalog reader).

    Refuses URL schemes other than http/https and paths that leave the images root lexically
    (``..``, absolute paths elsewhere). Symlinks are checked later, when the file is opened.
    """
    if is_url(ref):
        parts = urlsplit(ref)
        if parts.scheme.lower() not in URL_SCHEMES:
            raise ImageError(f"image URL {ref!r} has unsupported scheme {parts.scheme!r}; allowed: {', '.join(URL_SCHEMES)}")
        if not parts.netloc:
            raise ImageError(f"image URL {ref!r} has no host")
        return
    _lexical_target(ref, images_root)


def resolve_image_path(ref: str, images_root: Path | str | None) -> Path:
    """The real file a path reference points at, refused when it (or a symlink on the way) leaves the root."""
    root, target = _lexical_target(ref, images_root)
    real_root = root.resolve()
    real = target.resolve()
    if not real.is_relative_to(real_root):
        raise ImageError(f"image path {ref!r} leads outside the images root {str(root)!r} (symlink); refused")
    if not real.exists():
        raise ImageError(f"image not found: {ref!r} (looked for {str(target)!r})")
    if not real.is_file():
        raise ImageError(f"image path {ref!r} is not a regular file")
    return real


def _fetch_url(ref: str, max_bytes: int, timeout_s: float, policy: UrlPolicy | None) -> bytes:
    check_image_ref(ref, None)
    return fetch_url(ref, policy=policy or DEFAULT_POLICY, max_bytes=max_bytes, timeout_s=timeout_s)


def fetch_image_bytes(
    ref: str,
    images_root: Path | str | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_URL_TIMEOUT_S,
    policy: UrlPolicy | None = None,
) -> bytes:
    """The raw bytes of an image reference (file or URL), within ``max_bytes``; a URL's addresses are checked by
    ``policy`` (default: public addresses only, see :mod:`indexing.url_fetch`)."""
    if is_url(ref):
        return _fetch_url(ref, max_bytes, timeout_s, policy)
    path = resolve_image_path(ref, images_root)
    # the one place an image path is opened: O_NOFOLLOW (the resolved path has no symlink left, so one
    # appearing now is a swap), O_NONBLOCK (a FIFO swapped in must not hang the batch), then fstat
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageError(f"image {ref!r} cannot be read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"image path {ref!r} is not a regular file")
        if st.st_size > max_bytes:
            raise ImageError(f"image {ref!r} is too large: {st.st_size} bytes (limit {max_bytes})")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # owned by f now
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(f"image {ref!r} cannot be read: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:  # the file grew under us
        raise ImageError(f"image {ref!r} is too large: more than {max_bytes} bytes")
    return data


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "image"):
    """Decode image bytes completely into an RGB ``PIL.Image`` (alpha composited on white, EXIF rotation applied)."""
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(f"{source} is not an image: the file is empty")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped PIL's global switch; truncated files would pass silently
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated images cannot be detected")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"{source} is corrupt: size {w}x{h}")
            if w * h > max_pixels:
                raise ImageError(f"{source} refused as a decompression bomb: {w}x{h} = {w * h} pixels (limit {max_pixels})")
            img.load()  # force the full decode: truncated or corrupt data fails here, not later in the encoder
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{source} refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{source} is not an image (unrecognized or refused format, {len(data)} bytes; accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{source} is corrupt or truncated: {e}") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception as e:  # a malformed EXIF block must not fail the image
        log.debug("%s: EXIF orientation ignored (%s)", source, e)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(
    ref: str,
    images_root: Path | str | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_URL_TIMEOUT_S,
    policy: UrlPolicy | None = None,
):
    """Read and fully decode the image ``ref`` (path under ``images_root`` or URL) -> RGB ``PIL.Image``."""
    data = fetch_image_bytes(ref, images_root, max_bytes=max_bytes, timeout_s=timeout_s, policy=policy)
    return decode_image(data, max_pixels=max_pixels, source=f"image {ref!r}")


def image_digest(
    ref: str,
    images_root: Path | str | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_URL_TIMEOUT_S,
) -> str:
    """sha256 (hex) of the image's bytes, for content hashing (no decoding)."""
    return hashlib.sha256(fetch_image_bytes(ref, images_root, max_bytes=max_bytes, timeout_s=timeout_s)).hexdigest()
