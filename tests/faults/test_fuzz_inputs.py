"""Fuzz-style bad input: random and truncated bytes, huge declared dimensions and odd modes through the
image decoder and through the dataset reader + preprocessing stage of the pipeline. Every case ends as a
decoded RGB image or a recorded skip with a reason; nothing crashes or hangs (pytest-timeout bounds it)."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from residual_core.images import ImageDecodeError, decode_image

pytestmark = pytest.mark.timeout(300)


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _huge_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring `width` x `height` with a tiny (wrong) data stream."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _huge_bmp(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\x00" * 16


def _huge_gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x2c" + b"\x00" * 9 + b"\x3b"


def _odd_modes() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    cases = {}
    for mode in ("1", "L", "LA", "P", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr", "LAB", "HSV"):
        try:
            converted = rgb.convert(mode)
        except ValueError:
            converted = Image.new(mode, (20, 24))
        for fmt in ("PNG", "TIFF"):
            try:
                cases[f"mode-{mode}.{fmt.lower()}"] = _save(converted, fmt)
            except (OSError, ValueError, KeyError):
                continue  # the format cannot store the mode
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    cases["palette-transparency.png"] = _save(palette, "PNG")
    cases["animated.gif"] = _save(rgb.convert("P"), "GIF")
    return cases


def _bad_inputs() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cases = {f"random-{i}": rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()
             for i, n in enumerate([0, 1, 7, 64, 513, 4096])}
    for fmt in ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP"):
        data = _save(good, fmt)
        for cut in (8, 30, len(data) // 2, len(data) - 5):
            cases[f"truncated-{fmt.lower()}-{cut}"] = data[:cut]
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        cases[f"bitflip-{fmt.lower()}"] = bytes(flipped)
        cases[f"magic-only-{fmt.lower()}"] = data[:12] + rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    cases.update({"huge-png": _huge_png(60000, 60000), "huge-png-max": _huge_png(2**31 - 1, 2**31 - 1),
                  "huge-bmp": _huge_bmp(100000, 100000), "huge-gif": _huge_gif(65535, 65535),
                  "zero-dim-png": _huge_png(0, 10), "text": b"hello, not an image\n" * 10})
    return cases


def test_decoder_never_crashes_on_bad_bytes_and_odd_modes():
    outcomes = {}
    for name, data in {**_bad_inputs(), **_odd_modes()}.items():
        try:
            image = decode_image(data, max_pixels=4 * 2**20)
        except ImageDecodeError as exc:
            assert str(exc), name  # a reason, never an empty message
            outcomes[name] = f"skip: {exc}"
            continue
        assert image.mode == "RGB" and image.width > 0 and image.height > 0, name
        np.asarray(image)  # fully decoded
        outcomes[name] = "ok"
    for name in ("huge-png", "huge-png-max", "huge-bmp", "huge-gif", "random-0", "text"):
        assert outcomes[name].startswith("skip"), (name, outcomes[name])
    assert all(outcomes[name] == "ok" for name in outcomes if name.startswith("mode-L.")), outcomes


def test_pipeline_stage_records_every_bad_row_as_skipped(tmp_path):
    from workflows.datasets.writer import write_dataset
    from workflows.pipelines.scoring import ScoringJob, prepare_shard
    from workflows.pipelines.shards import plan_shards

    bad, odd = _bad_inputs(), _odd_modes()
    rows = [{"dataset": "fuzz", "category": "things", "split": "test", "label": 0, "defect_type": "good",
             "image": data, "mask": None, "width": 32, "height": 32, "source": name}
            for name, data in {**bad, **odd}.items() if data]  # empty bytes: refused by the writer (below)
    url = str(tmp_path / "fuzz")
    write_dataset(rows, url)
    from workflows.datasets.schema import SchemaError

    with pytest.raises(SchemaError, match="random-0"):
        write_dataset([{**rows[0], "image": b"", "source": "random-0"}], str(tmp_path / "empty"))
    job = ScoringJob(job_id="fuzz", job_url=str(tmp_path / "job"), backbone={},
                     method={"name": "baseline", "params": {}}, banks={}, image_size=32)
    assert job.preprocess == "res2clip"  # resolved from the method when not given
    kept, skipped = [], []
    for shard in plan_shards(url, split="test", shard_size=16):
        out = prepare_shard({"job": job.to_json(), "shard": json.dumps(shard.to_dict())})
        from workflows.pipelines.prepared import PreparedShard

        prepared = PreparedShard.from_row(out)
        assert prepared.images.shape[1:] == (3, 32, 32) and prepared.images.dtype == np.uint8
        kept += prepared.kept
        skipped += prepared.skipped
    assert len(kept) + len(skipped) == len(rows)  # seen = scored + skipped
    assert all(s["skip_reason"] for s in skipped)
    skipped_sources = {s["source"] for s in skipped}
    for name in ("huge-png", "huge-bmp", "random-1", "text", "truncated-png-30"):
        assert name in skipped_sources, name


def test_corrupt_parquet_file_fails_clearly_naming_the_file(tmp_path):
    from tests.workflows.pipelines.tiny_data import write_tiny
    from workflows.datasets.reader import read_manifest
    from workflows.pipelines.shards import plan_shards

    url = write_tiny(str(tmp_path / "data"), n_train=1, n_normal=1, n_anomalous=1)
    part = next(p for p in read_manifest(url)["partitions"] if p["split"] == "test")
    rel = sorted(part["files"])[0]
    path = tmp_path / "data" / rel
    data = path.read_bytes()
    noise = np.random.default_rng(3).bytes(len(data))
    for corrupt in (data[: len(data) // 2], b"PAR1" + b"\x00" * 64, noise):
        path.write_bytes(corrupt)
        with pytest.raises(Exception) as caught:  # noqa: B017 - the type varies; the message is checked
            plan_shards(url, split="test", shard_size=4)
        assert rel in str(caught.value) or rel.rsplit("/", 1)[-1] in str(caught.value), caught.value
