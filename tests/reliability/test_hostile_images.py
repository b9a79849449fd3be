"""Hostile image references and files: path confinement per catalog row, decompression bombs refused
from the header within a time and memory bound, truncated/odd files refused with a precise ImageError."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image

from indexing.catalog import Product, RowError, read_catalog
from indexing.errors import ImageError
from indexing.images import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, decode_image, fetch_image_bytes, load_image

REPO = Path(__file__).resolve().parents[2]
PHOTO = "images/13199.jpg"  # a real catalog photo (ASICS running shoe, 224x224 JPEG)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int, *, extra_chunks: bytes = b"") -> bytes:
    """A *complete, valid* 1-bit greyscale PNG of ``width x height`` black pixels.

    The pixel data (``height`` rows of a filter byte plus ``ceil(width/8)`` zero bytes) is compressed
    row by row with zlib, so neither this generator nor the file is large: 25,000 x 25,000 pixels
    (625 megapixels, 78 MB of raw scanlines, about 2.3 GB as RGB) is about 80 KB on disk.
    """
    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(height)]
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra_chunks + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    files = {
        "giant.png": bomb_png(25_000, 25_000),  # over PIL's own hard limit too (2 x 89.5 MP)
        "over_cap.png": bomb_png(8_000, 8_000),  # 64 MP: over our cap (40 MP), under PIL's warning (89.5 MP)
        "ok.png": bomb_png(1_000, 1_000),  # same generator, under the cap: must decode
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


def test_the_bomb_files_are_real_images_not_just_headers(bombs):
    assert bombs["giant.png"].stat().st_size < 200_000
    img = decode_image(bombs["ok.png"].read_bytes(), source="ok.png")
    assert img.size == (1_000, 1_000) and img.getextrema() == ((0, 0), (0, 0), (0, 0))
    # with PIL's own checks out of the way, the 64 MP file decodes completely: it is a real bomb
    with Image.open(bombs["over_cap.png"]) as im:
        assert im.size == (8_000, 8_000)
        im.load()
        assert im.getbbox() is None  # every pixel black


def test_bombs_are_refused_from_the_header_fast_and_without_memory(bombs):
    for name in ("giant.png", "over_cap.png"):
        data = bombs[name].read_bytes()
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match=r"refused as a decompression bomb") as e:
            decode_image(data, source=f"image {name!r}")
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert name in str(e.value)
        assert elapsed < 5.0, f"{name}: refusal took {elapsed:.2f} s"
        assert peak < 10 * 1024 * 1024, f"{name}: {peak} bytes traced while refusing"
    with pytest.raises(ImageError, match=rf"8000x8000 = 64000000 pixels \(limit {DEFAULT_MAX_PIXELS}\)"):
        decode_image(bombs["over_cap.png"].read_bytes())
    # the cap is a parameter: a lower one refuses the 1 MP image as well
    with pytest.raises(ImageError, match=r"1000x1000 = 1000000 pixels \(limit 999999\)"):
        decode_image(bombs["ok.png"].read_bytes(), max_pixels=999_999)


def test_bomb_refusal_peak_rss_in_a_fresh_process(bombs):
    """tracemalloc does not see PIL's C buffers: measure the whole process's peak RSS instead (VmHWM, which
    starts afresh at exec; ru_maxrss keeps the forking parent's peak on Linux)."""
    code = (
        "import json, resource, sys, time\n"
        "from indexing.errors import ImageError\n"
        "from indexing.images import load_image\n"
        "out = {}\n"
        "for name in sys.argv[2:]:\n"
        "    t0 = time.perf_counter()\n"
        "    try:\n"
        "        load_image(name, sys.argv[1]); out[name] = ['decoded', 0.0]\n"
        "    except ImageError as e:\n"
        "        out[name] = [str(e), time.perf_counter() - t0]\n"
        "out['maxrss_kb'] = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])\n"
        "print(json.dumps(out))\n"
    )
    root = bombs["giant.png"].parent
    p = subprocess.run([sys.executable, "-c", code, str(root), "giant.png", "over_cap.png"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for name in ("giant.png", "over_cap.png"):
        msg, elapsed = out[name]
        assert "decompression bomb" in msg and elapsed < 5.0, (name, msg, elapsed)
    # decoding the giant one would need >= 625 MB (mode "1" keeps a byte per pixel); 200 MB is PIL + Python
    assert out["maxrss_kb"] < 200 * 1024, out


def test_png_text_chunk_bomb_is_refused(tmp_path):
    """A zTXt chunk that inflates to 64 MB: PIL's text-chunk limit trips and the image is refused."""
    ztxt = b"Comment\x00\x00" + zlib.compress(b"A" * (64 * 1024 * 1024), 9)
    (tmp_path / "ztxt.png").write_bytes(bomb_png(16, 16, extra_chunks=_chunk(b"zTXt", ztxt)))
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=r"image 'ztxt.png' is corrupt or truncated: .*(Too Large|too large)"):
        load_image("ztxt.png", tmp_path)
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("keep", [0.5, 0.9, 33 / 2000])
def test_truncated_png_is_refused_naming_the_file(tmp_path, keep):
    img = Image.effect_noise((200, 200), 64).convert("RGB")  # noise: the data does not compress away
    img.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    cut = data[: max(int(len(data) * keep), 33)]  # 33 bytes: signature + IHDR, no pixel data at all
    (tmp_path / "cut.png").write_bytes(cut)
    assert load_image("full.png", tmp_path).size == (200, 200)
    with pytest.raises(ImageError, match=r"image 'cut.png' is corrupt or truncated"):
        load_image("cut.png", tmp_path)


def test_truncated_real_photo_is_refused(shared_data, tmp_path):
    data = (shared_data / "fashion" / PHOTO).read_bytes()
    (tmp_path / "shoe.jpg").write_bytes(data[: len(data) - 200])
    with pytest.raises(ImageError, match=r"image 'shoe.jpg' is corrupt or truncated"):
        load_image("shoe.jpg", tmp_path)


def test_formats_outside_the_allow_list_are_refused(tmp_path):
    """EPS would be handed to Ghostscript by PIL; it is refused before any decoder runs."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
    (tmp_path / "x.jpg").write_bytes(eps)
    with Image.open(tmp_path / "x.jpg") as im:  # PIL alone recognizes it ...
        assert im.format == "EPS" and "EPS" not in ALLOWED_FORMATS
    with pytest.raises(ImageError, match=r"image 'x.jpg' is not an image \(unrecognized or refused format"):
        load_image("x.jpg", tmp_path)  # ... the indexer does not


# --------------------------------------------------------------------------- path confinement, per row
@pytest.fixture
def hostile_root(tmp_path, shared_data) -> tuple[Path, Path, dict[str, str]]:
    """An images root with one real photo, and a catalog whose rows point everywhere they should not."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    photo = (shared_data / "fashion" / PHOTO).read_bytes()
    (root / "images" / "shoe.jpg").write_bytes(photo)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(photo)  # a valid image: only the location is wrong
    (root / "images" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "images" / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "images" / "inside_link.jpg").symlink_to(root / "images" / "shoe.jpg")  # stays inside: fine
    os.mkfifo(root / "images" / "pipe.jpg")
    (root / "images" / "adir.jpg").mkdir()
    refs = {
        "good": "images/shoe.jpg",
        "good_abs": str(root / "images" / "shoe.jpg"),
        "good_link": "images/inside_link.jpg",
        "dotdot": "../../etc/passwd",
        "dotdot_deep": "images/../../outside/secret.jpg",
        "abs_outside": str(outside / "secret.jpg"),
        "etc": "/etc/passwd",
        "prefix_sibling": str(tmp_path / "root2" / "x.jpg"),  # shares the root's prefix as a string
        "symlink_out": "images/link.jpg",
        "symlinked_dir_out": "images/linkdir/secret.jpg",
        "fifo": "images/pipe.jpg",
        "directory": "images/adir.jpg",
        "nul": "images/shoe.jpg\x00.png",
        "scheme": "file:///etc/passwd",
    }
    catalog = tmp_path / "catalog.csv"
    with catalog.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "title", "image"])
        for name, ref in refs.items():
            w.writerow([name, f"product {name}", ref])
    return root, catalog, refs


LEXICAL = {"dotdot", "dotdot_deep", "abs_outside", "etc", "prefix_sibling", "nul", "scheme"}
ON_OPEN = {"symlink_out": "leads outside the images root", "symlinked_dir_out": "leads outside the images root",
           "fifo": "is not a regular file", "directory": "is not a regular file"}


def test_each_hostile_row_is_refused_with_a_precise_reason_and_the_rest_goes_on(hostile_root):
    root, catalog, refs = hostile_root
    items = list(read_catalog(catalog, images_root=root))
    assert len(items) == len(refs)
    errors = {i.id: i.reason for i in items if isinstance(i, RowError)}
    products = {i.id: i for i in items if isinstance(i, Product)}
    # form checks in the reader: no I/O, the row is an error record and reading goes on
    assert set(errors) == LEXICAL
    for name in ("dotdot", "dotdot_deep", "abs_outside", "etc", "prefix_sibling"):
        assert errors[name].startswith("image: image path") and "is outside the images root" in errors[name], errors[name]
        assert repr(refs[name]) in errors[name]
    assert "NUL byte" in errors["nul"] and "unsupported scheme 'file'" in errors["scheme"]
    # symlinks, FIFOs and directories pass the form check and are refused where the file is opened
    for name, reason in ON_OPEN.items():
        with pytest.raises(ImageError, match=reason) as e:
            fetch_image_bytes(products[name].image, root)
        assert repr(refs[name]) in str(e.value)
    for name in ("good", "good_abs", "good_link"):
        assert load_image(products[name].image, root).size == (224, 224)


def test_fifo_is_refused_without_blocking(hostile_root):
    root, _, _ = hostile_root
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="not a regular file"):
        fetch_image_bytes("images/pipe.jpg", root)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.slow
def test_the_indexing_batch_refuses_hostile_rows_and_indexes_the_rest(hostile_root, bombs, tmp_path):
    """The real batch function (real catalog reader, real models, LocalEngine): one error per hostile row."""
    from indexing.engines import create_engine
    from indexing.pipeline import IndexJob
    from workers.jobs import run_index_job
    from workers.settings import load_settings

    root, catalog, refs = hostile_root
    for name in ("giant.png", "over_cap.png"):
        (root / "images" / name).write_bytes(bombs[name].read_bytes())
    data = (root / "images" / "shoe.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])
    extra = {"bomb": "images/giant.png", "bomb2": "images/over_cap.png", "cut": "images/cut.jpg", "no_image": ""}
    with catalog.open("a", newline="") as f:
        csv.writer(f).writerows([[name, f"product {name}", ref] for name, ref in extra.items()])
    engine = create_engine("local", path=tmp_path / "engine")
    job = IndexJob(catalog=str(catalog), index="products", images_root=str(root), batch_size=64, device="cpu", text_backend="onnx-int8")
    t0 = time.perf_counter()
    s = run_index_job(engine, load_settings(data_dir=tmp_path), job, progress=False)
    elapsed = time.perf_counter() - t0
    reasons = {e.id: e.reason for e in s.errors}
    assert set(reasons) == LEXICAL | set(ON_OPEN) | {"bomb", "bomb2", "cut"}
    assert "decompression bomb" in reasons["bomb"] and "decompression bomb" in reasons["bomb2"]
    assert "corrupt or truncated" in reasons["cut"]
    for name, reason in ON_OPEN.items():
        assert reason in reasons[name]
    assert s.indexed == 4  # good, good_abs, good_link, no_image
    assert set(engine.get("products", ["good", "good_abs", "good_link", "no_image", "bomb", "symlink_out"])) == {"good", "good_abs", "good_link", "no_image"}
    assert elapsed < 120
