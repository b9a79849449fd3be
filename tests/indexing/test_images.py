"""indexing.images: safe resolution, limits and complete decoding of product images (real photos)."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from indexing.errors import EncoderError, ImageError
from indexing.images import check_image_ref, decode_image, fetch_image_bytes, image_digest, load_image

PHOTO = "images/13199.jpg"  # ASICS running shoe, a real catalog photo


@pytest.fixture(scope="module")
def fashion(shared_data) -> Path:
    return shared_data / "fashion"


@pytest.fixture
def root(tmp_path, fashion) -> Path:
    """An images root holding one real photo (copied), so tests can add bad files beside it."""
    r = tmp_path / "root"
    (r / "images").mkdir(parents=True)
    (r / "images" / "shoe.jpg").write_bytes((fashion / PHOTO).read_bytes())
    return r


def _png(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width x height`` pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_real_photo_loads_as_rgb(fashion):
    img = load_image(PHOTO, fashion)
    assert img.mode == "RGB" and img.size == (224, 224)
    assert ImageError.__mro__[1] is EncoderError


def test_digest_is_sha256_of_the_file_bytes(fashion):
    assert image_digest(PHOTO, fashion) == hashlib.sha256((fashion / PHOTO).read_bytes()).hexdigest()
    assert image_digest(PHOTO, fashion) != image_digest("images/12993.jpg", fashion)


def test_missing_file(root):
    with pytest.raises(ImageError, match="image not found"):
        load_image("images/nope.jpg", root)


@pytest.mark.parametrize("ref", ["../../etc/passwd", "images/../../outside.jpg", "/etc/passwd", "..", "images/../../root/images/shoe.jpg"])
def test_path_traversal_is_refused_without_io(ref, root):
    # the last one re-enters a *different* directory named like the root: still outside after normalization
    with pytest.raises(ImageError, match="outside the images root"):
        check_image_ref(ref, root / "images")
    with pytest.raises(ImageError, match="outside the images root"):
        load_image(ref, root / "images")


def test_absolute_path_inside_the_root_is_accepted(root):
    assert load_image(str(root / "images" / "shoe.jpg"), root).size == (224, 224)


def test_symlink_leading_out_of_the_root_is_refused(root, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((root / "images" / "shoe.jpg").read_bytes())
    (root / "images" / "link.jpg").symlink_to(secret)
    with pytest.raises(ImageError, match="leads outside the images root"):
        load_image("images/link.jpg", root)


def test_not_an_image(root):
    (root / "images" / "notes.jpg").write_text("this is not a JPEG\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image("images/notes.jpg", root)
    (root / "images" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="not an image: the file is empty"):
        load_image("images/empty.jpg", root)


def test_truncated_jpeg_is_refused(root):
    data = (root / "images" / "shoe.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image("images/cut.jpg", root)


def test_corrupt_jpeg_is_refused(root):
    data = bytearray((root / "images" / "shoe.jpg").read_bytes())
    # the file still opens as a JPEG (header intact) but its Huffman tables are garbage
    i = data.find(b"\xff\xc4")
    assert i > 0
    for j in range(i + 5, i + 40):
        data[j] = 0xFF if j % 2 else 0x00
    (root / "images" / "bad.jpg").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt or truncated: broken data stream"):
        load_image("images/bad.jpg", root)


def test_decompression_bombs_are_refused_fast(root):
    (root / "images" / "bomb.png").write_bytes(_png(100_000, 100_000))  # 10^10 pixels in ~100 bytes
    (root / "images" / "big.png").write_bytes(_png(12_000, 12_000))  # 144 MP: over our default limit
    t0 = time.perf_counter()
    for name in ("bomb.png", "big.png"):
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(f"images/{name}", root)
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(ImageError, match="decompression bomb: 224x224"):
        load_image("images/shoe.jpg", root, max_pixels=10_000)


def test_file_over_the_byte_limit(root):
    with pytest.raises(ImageError, match="too large"):
        load_image("images/shoe.jpg", root, max_bytes=1_000)


def test_unreachable_url_fails_clearly_and_fast():
    from indexing.url_fetch import UrlPolicy

    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="unreachable"):  # loopback allowed here, so that the connection is tried
        load_image("http://127.0.0.1:9/shoe.jpg", None, timeout_s=2.0, policy=UrlPolicy.from_strings(["127.0.0.1"]))
    assert time.perf_counter() - t0 < 5.0
    with pytest.raises(ImageError, match="refused: .* a loopback address"):  # by default not even tried
        load_image("http://127.0.0.1:9/shoe.jpg", None, timeout_s=2.0)


@pytest.mark.parametrize("ref", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/y"])
def test_other_url_schemes_are_refused(ref):
    with pytest.raises(ImageError, match="unsupported scheme"):
        load_image(ref, None)


def test_transparent_png_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (5, 5, 15, 15))
    img.save(tmp_path / "p.png")
    out = load_image("p.png", tmp_path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert out.getpixel((10, 10)) == (200, 0, 0)


def test_greyscale_and_palette_images_become_rgb(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "g.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "p.gif")
    assert load_image("g.png", tmp_path).getpixel((1, 1)) == (128, 128, 128)
    assert load_image("p.gif", tmp_path).mode == "RGB"


def test_fetch_and_decode_are_usable_separately(fashion):
    data = fetch_image_bytes(PHOTO, fashion)
    assert decode_image(data, source="x").size == (224, 224)
