"""`scan` of a hostile archive: links out of the folder, FIFOs, sockets, devices, /dev/zero, oversized
files, decompression bombs, huge images, odd names and modes. The scan completes (pytest-timeout bounds
it: a blocking open of the FIFO bait would hang it), every listed entry is scored or skipped with a
one-line reason, and nothing outside the folder is read. Also: the reader's byte and time limits
(local and S3) and the decode memory per pixel that `scan`'s Ray memory reservation assumes."""

from __future__ import annotations

import io
import os
import socket
import stat
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from tests.workflows.scan.archive import _crop, _photo, _png, upload, write_normals  # noqa: E402
from workflows.config import load_config  # noqa: E402
from workflows.datasets.schema import content_id  # noqa: E402
from workflows.ingest.source import FileTooLargeError, SourceTree  # noqa: E402
from workflows.pipelines.scan import (  # noqa: E402
    DECODE_BYTES_PER_PIXEL,
    SCAN_MAX_PIXELS,
    ScanOptions,
    decode_task_memory,
    run_scan,
)
from workflows.pipelines.scan_outputs import ScanStore  # noqa: E402

pytestmark = pytest.mark.timeout(900)  # generous: a loaded 2-core machine; a hang fails here

CONFIG = ["backbone.image_size=64", "tracking.enabled=false", "device=cpu", "evaluate.batch_size=16"]
MAX_BYTES = 1 << 20  # small, so an oversized file is cheap to make


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """Ray workers inherit the environment at start: the S3 server's settings must be set first."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring `width` x `height` (a decompression bomb's signature), tiny data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _write(path: str | bytes, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


class Hostile:
    """The archive `<root>/archive/brick/...` and what each entry must become."""

    def __init__(self, root) -> None:
        self.root = root
        self.archive = str(root / "archive")
        self.scored: set[str] = set()  # keys (as stored in results) that must be scored
        self.skipped: dict[str, str] = {}  # key -> reason fragment
        self.ids: dict[str, str] = {}  # key -> content id of the bytes it must be scored with

    def file(self, name: str | bytes, data: bytes, reason: str | None = None, key: str | None = None) -> None:
        folder = os.path.join(self.archive, "brick")
        if isinstance(name, bytes):  # a file name that is not valid UTF-8
            _write(os.path.join(os.fsencode(folder), name), data)
        else:
            _write(os.path.join(folder, name), data)
        self._expect(key or f"brick/{name}", reason, data)

    def node(self, name: str, reason: str) -> None:
        self._expect(f"brick/{name}", reason, None)

    def _expect(self, key: str, reason: str | None, data: bytes | None) -> None:
        if reason is None:
            self.scored.add(key)
            self.ids[key] = content_id(data)
        else:
            self.skipped[key] = reason


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    arc = Hostile(root)
    brick = os.path.join(arc.archive, "brick")
    outside = str(root / "outside")
    os.makedirs(os.path.join(brick, "sub"))
    os.makedirs(os.path.join(outside, "images"))
    rng = np.random.default_rng(0)
    photo = _photo("brick")
    crops = [_png(_crop(photo, rng)) for _ in range(4)]
    good = crops[0]
    # ordinary images, including odd names and modes (all scored)
    arc.file("good-0.png", crops[0])
    arc.file("sub/deep.png", crops[1])
    arc.file("ünïcødé 画像.png", crops[2])
    arc.file("new\nline.png", crops[3])
    arc.file(b"bad-\xff-bytes.png", crops[1], key="brick/bad-\\xff-bytes.png")
    rgb = Image.fromarray(_crop(photo, rng))
    sixteen = Image.fromarray(np.asarray(rgb)[..., 0].astype(np.uint16) * 257)
    arc.file("sixteen-bit.png", _save(sixteen, "PNG"))
    assert Image.open(os.path.join(brick, "sixteen-bit.png")).mode.startswith("I;16")
    arc.file("cmyk.jpg", _save(rgb.convert("CMYK"), "JPEG"))
    arc.file("palette.gif", _save(rgb.convert("P"), "GIF"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW": not applied (as the authors' loaders)
    arc.file("exif-rotated.jpg", _save(rgb.crop((0, 0, 64, 40)), "JPEG", exif=exif))
    arc.file("big-legal.png", _save(Image.new("RGB", (3000, 3000), (120, 90, 60)), "PNG"))  # 9 Mpx
    # a JPEG over the pixel limit (24 Mpx > 16 Mpx): decoded at DCT 1/2 instead of skipped
    arc.file("big-camera.jpg", _save(Image.new("RGB", (6000, 4000), (100, 110, 120)), "JPEG", quality=80))
    # bad content
    arc.file("zero.png", b"", "empty input")
    arc.file("truncated.png", good[: len(good) // 2], "truncated")
    arc.file("bomb.png", _bomb_png(60000, 60000), "too large")
    arc.file("huge-flat.png", _save(Image.new("RGB", (5000, 5000), (0, 0, 0)), "PNG"), "too large")  # 25 Mpx
    arc.file("heavy.png", good + bytes(MAX_BYTES), "file too large")
    arc.file(".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64), "not an image")
    # not regular files
    os.mkfifo(os.path.join(brick, "x.png"))
    arc.node("x.png", "not a regular file: a FIFO")
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.path.join(brick, "socket.png"))
    arc.node("socket.png", "not a regular file: a socket")
    try:  # a device node (tests run as root; a container may still forbid mknod)
        os.mknod(os.path.join(brick, "dev.png"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
        arc.node("dev.png", "not a regular file: a character device")
    except OSError:
        pass
    # links out of the folder: never opened
    _write(os.path.join(outside, "secret.png"), crops[3] + b"outside")  # a valid image if it were read
    _write(os.path.join(outside, "images", "o.png"), good + b"outside-dir")
    os.mkfifo(os.path.join(outside, "bait.fifo"))  # a blocking open would hang the scan
    for name, target in [("outside.png", os.path.join(outside, "secret.png")),
                         ("bait.png", os.path.join(outside, "bait.fifo")), ("dev-zero.png", "/dev/zero"),
                         ("outdir", os.path.join(outside, "images")), ("etc-passwd.png", "/etc/passwd"),
                         ("relative-out.png", "../../outside/secret.png")]:
        os.symlink(target, os.path.join(brick, name))
        arc.node(name, "symlink escapes the archive")
    # links inside: a file link is followed, a directory link is not walked, loops and dangling refused
    os.symlink("good-0.png", os.path.join(brick, "alias.png"))
    arc.scored.add("brick/alias.png")
    arc.ids["brick/alias.png"] = content_id(good)
    os.symlink("sub", os.path.join(brick, "sub-link"))
    arc.node("sub-link", "not a regular file: a directory")
    os.symlink("loop.png", os.path.join(brick, "loop.png"))
    arc.node("loop.png", "not a regular file: a symlink that does not resolve")
    os.symlink("missing.png", os.path.join(brick, "dangling.png"))
    arc.node("dangling.png", "not found")
    write_normals(str(root / "references"), 2, seed=1)
    yield arc
    server.close()


@pytest.fixture(scope="module")
def hostile_scan(local_ray, hostile):
    options = ScanOptions(input=hostile.archive, output=str(hostile.root / "out"),
                          references=str(hostile.root / "references"), threshold=1.0, shard_size=8,
                          max_bytes=MAX_BYTES, read_timeout_s=120)
    assert options.max_pixels == SCAN_MAX_PIXELS  # the scan default, not ingest's 64 Mpx
    summary = run_scan(load_config(None, CONFIG), options, progress=False)
    return summary, ScanStore(options.output)


def test_hostile_archive_scans_to_completion_with_a_reason_for_every_skip(hostile, hostile_scan):
    summary, store = hostile_scan
    results = {r["source"]: r for r in store.read_table("results").to_pylist()}
    skipped = {r["source"]: r["reason"] for r in store.read_table("skipped").to_pylist()}
    assert set(results) == hostile.scored
    assert set(skipped) == set(hostile.skipped)
    for key, fragment in hostile.skipped.items():
        assert fragment in skipped[key], (key, skipped[key])
        assert "\n" not in skipped[key] and len(skipped[key]) <= 500
    assert summary["seen"] == summary["planned_images"] == len(hostile.scored) + len(hostile.skipped)
    assert summary["seen"] == summary["scored"] + summary["skipped"] and summary["reconciles"]
    for key, row in results.items():
        assert row["image_id"] == hostile.ids[key], key  # the bytes inside the archive, nothing else
    assert summary["skip_reasons"]["symlink escapes the archive"] == 6


def test_nothing_outside_the_archive_is_listed_or_scored(hostile, hostile_scan):
    summary, store = hostile_scan
    sources = [r["source"] for r in store.read_table("results").to_pylist()]
    sources += [r["source"] for r in store.read_table("skipped").to_pylist()]
    assert not [s for s in sources if s.startswith(("brick/outdir/", "brick/sub-link/"))]  # not walked
    assert sources.count("brick/sub/deep.png") == 1
    outside = {content_id(open(os.path.join(hostile.root, "outside", p), "rb").read())
               for p in ("secret.png", "images/o.png")}
    assert not outside & {r["image_id"] for r in store.read_table("results").to_pylist()}
    assert stat.S_ISFIFO(os.lstat(os.path.join(hostile.root, "outside", "bait.fifo")).st_mode)


def test_large_images_are_scored_in_original_pixels(hostile_scan):
    _, store = hostile_scan
    rows = {r["source"]: r for r in store.read_table("results").to_pylist()}
    camera = rows["brick/big-camera.jpg"]  # decoded at 3000 x 2000, reported in the original's pixels
    assert (camera["width"], camera["height"]) == (6000, 4000)
    assert 0 <= camera["bbox_x0"] < camera["bbox_x1"] <= 6000
    assert 0 <= camera["bbox_y0"] < camera["bbox_y1"] <= 4000
    assert (rows["brick/big-legal.png"]["width"], rows["brick/big-legal.png"]["height"]) == (3000, 3000)
    assert (rows["brick/exif-rotated.jpg"]["width"], rows["brick/exif-rotated.jpg"]["height"]) == (64, 40)


def test_oversized_and_empty_objects_on_s3_are_refused_from_the_listing(local_ray, s3_server, tmp_path):
    rng = np.random.default_rng(5)
    photo = _photo("brick")
    folder = tmp_path / "arc"
    (folder / "brick").mkdir(parents=True)
    for i in range(3):
        _write(str(folder / "brick" / f"g{i}.png"), _png(_crop(photo, rng)))
    _write(str(folder / "brick" / "heavy.png"), bytes(MAX_BYTES + 1))
    _write(str(folder / "brick" / "zero.png"), b"")
    write_normals(str(tmp_path / "references"), 2, seed=1)
    base = s3_server.unique_url("hostile")
    upload(str(folder), f"{base}/archive")
    options = ScanOptions(input=f"{base}/archive", output=f"{base}/out",
                          references=str(tmp_path / "references"), threshold=1.0, shard_size=4,
                          max_bytes=MAX_BYTES)
    summary = run_scan(load_config(None, CONFIG), options, progress=False)
    assert (summary["seen"], summary["scored"], summary["skipped"]) == (5, 3, 2) and summary["reconciles"]
    skipped = {r["source"]: r["reason"] for r in ScanStore(options.output).read_table("skipped").to_pylist()}
    assert skipped["brick/heavy.png"] == f"file too large: {MAX_BYTES + 1} bytes > max_bytes={MAX_BYTES}"
    assert "empty input" in skipped["brick/zero.png"]


def test_reads_are_bounded_in_bytes_and_time_local_and_s3(s3_server, tmp_path):
    from workflows import storage

    data = np.random.default_rng(1).bytes(3 << 20)  # three read chunks
    (tmp_path / "f.bin").write_bytes(data)
    tree = SourceTree(str(tmp_path))
    assert tree.read("f.bin", max_bytes=len(data), timeout_s=60) == data
    with pytest.raises(FileTooLargeError, match=f"> max_bytes={len(data) - 1}"):
        tree.read("f.bin", max_bytes=len(data) - 1, timeout_s=60)
    with pytest.raises(TimeoutError, match="not read within"):
        tree.read("f.bin", max_bytes=len(data), timeout_s=1e-9)  # the deadline passes during the 1st chunk
    url = s3_server.unique_url("reads")
    storage.atomic_write_bytes(f"{url}/f.bin", data)
    remote = SourceTree(url)
    assert remote.read("f.bin", max_bytes=len(data), timeout_s=60) == data  # size by HEAD
    with pytest.raises(FileTooLargeError):
        remote.read("f.bin", max_bytes=len(data) - 1, timeout_s=60)
    with pytest.raises(FileTooLargeError):  # the object grew after listing: the ranged read stops
        remote.read("f.bin", max_bytes=len(data) - 1, timeout_s=60, size=10)
    with pytest.raises(TimeoutError, match="no complete answer"):
        remote.read("f.bin", max_bytes=len(data), timeout_s=1e-3)  # moto sends 3 MiB in far more than 1 ms


_PEAK = r"""
import io, resource, sys
import numpy as np
from PIL import Image
from residual_core.images import decode_image
from residual_core.preprocess import get_preprocess

def encoded(mode, fmt, side):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (side, side), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.random((side, side), dtype=np.float32) * 1000)
    else:
        image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()

mode, fmt, preset, side = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
small, data = encoded(mode, fmt, 64), encoded(mode, fmt, side)  # the encoded bytes: in the baseline
get_preprocess(preset).image(decode_image(small), 64)  # imports and allocator warm-up: in the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
get_preprocess(preset).image(decode_image(data, max_pixels=side * side), 64)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((peak - base) / side / side)
"""
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.parametrize("mode,fmt,preset", [("RGB", "PNG", "res2clip"), ("I;16", "PNG", "resad"),
                                             ("F", "TIFF", "res2clip"), ("RGB", "PNG", "torch-bicubic")])
def test_decode_memory_per_pixel_stays_within_the_reserved_budget(mode, fmt, preset, tmp_path):
    """Peak RSS of one decode + preprocess in a fresh process, per pixel of a 3000 x 3000 image."""
    done = subprocess.run([sys.executable, "-c", _PEAK, mode, fmt, preset, "3000"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-2000:]
    per_pixel = float(done.stdout.split()[-1])
    assert per_pixel <= DECODE_BYTES_PER_PIXEL, (mode, preset, per_pixel)
    options = ScanOptions(input="x", output="y", references="z", threshold=1.0)
    assert decode_task_memory(options) >= DECODE_BYTES_PER_PIXEL * options.max_pixels + 2 * options.max_bytes
    assert decode_task_memory(ScanOptions(input="x", output="y", references="z", threshold=1.0,
                                          decode_memory=0)) == 0
