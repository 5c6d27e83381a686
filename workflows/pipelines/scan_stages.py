"""The two Ray Data stages of `scan`, plugged into `scoring.run_scoring` (the pipeline `evaluate` uses).

1. `prepare_scan_shard` (CPU task): read a shard's images (raw objects through
   `raw_images.read_items`: regular files inside the archive only, bounded in bytes and time, read
   ahead within a byte budget; or a Parquet row range), decode them with the pixel limit (JPEGs over it
   decoded reduced; optionally every JPEG, `jpeg_draft`), preprocess (the job's preset, which also says
   which part of the original each map covers); anything unusable becomes a skipped row with its
   reason (never an exception). Its memory is bounded per task (see `scan.decode_task_memory`). The
   shard crosses Ray as numpy columns (`prepared.PreparedShard`, uint8 pixels where the preset allows).
2. `ScanActor` (the `ScoringActor` pool, same model and bank caches): scores in batches, flags against
   the category's threshold, finds the top region, renders heat maps and overlay PNGs (the picture
   the model saw with the map on top: `reports.overlay`) of flagged images and commits the shard's
   tables, overlay files and marker. Only a small summary goes back to the driver.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from workflows.pipelines.prepared import PreparedShard, image_input, image_rows
from workflows.pipelines.raw_images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    ScanShard,
    display_key,
    one_line,
    read_items,
    shard_entries,
    shard_keys,
)
from workflows.pipelines.scoring import ScoringActor, ScoringJob

JPEG_DRAFT_FACTOR = 2  # `jpeg_draft`: JPEGs are decoded at the largest DCT reduction keeping >= 2 S a side


def _source_items(shard: ScanShard, max_bytes: int,
                  timeout_s: float) -> Iterator[tuple[str, bytes | None, str | None, str | None]]:
    """(source key, bytes or None, error or None, stored image_id or None) for every image of the shard."""
    if shard.parquet is not None:
        from workflows.pipelines.shards import Shard, read_shard

        table = read_shard(Shard.from_dict(shard.parquet), columns=("image_id", "image", "source"))
        for r in table.to_pylist():
            data = r["image"]
            if data is not None and len(data) > max_bytes:
                error = f"file too large: {len(data)} bytes > max_bytes={max_bytes}"
                yield r["source"], None, error, r["image_id"]
            else:
                yield r["source"], data, None, r["image_id"]
        return
    keys, sizes = shard_entries(shard)
    for key, data, error in read_items(shard.root_url, zip(keys, sizes, strict=True), max_bytes=max_bytes,
                                       timeout_s=timeout_s):
        yield key, data, error, None


def prepare_scan_shard(task: dict) -> dict:
    """Stage 1: decode and preprocess one shard; unusable images become skipped rows."""
    from residual_core.images import ImageDecodeError, decode_image_reduced
    from residual_core.preprocess import View, get_preprocess
    from workflows.datasets.schema import content_id

    job = ScoringJob.from_json(task["job"])
    preset = get_preprocess(job.preprocess)
    shard = ScanShard.from_dict(json.loads(task["shard"]))
    size, max_pixels = job.image_size, int(job.extra["max_pixels"])
    max_bytes = int(job.extra.get("max_bytes") or DEFAULT_MAX_BYTES)
    timeout_s = float(job.extra.get("read_timeout_s") or DEFAULT_READ_TIMEOUT_S)
    draft = (JPEG_DRAFT_FACTOR * size,) * 2 if job.extra.get("jpeg_draft") else None
    has_bank = f"{shard.dataset}/{shard.category}" in job.banks
    images, kept, skipped = image_rows(preset, size, shard.size if has_bank else 0), [], []
    if not has_bank:  # nothing to compare with: skip without reading the images
        reason = f"no references for category {shard.category}"
        items = iter([(key, None, reason, None) for key in _keys_only(shard)])
    else:
        items = _source_items(shard, max_bytes, timeout_s)
    for source, data, error, image_id in items:
        row = {"image_id": image_id or (content_id(data) if data is not None else None),
               "source": display_key(source)}
        if error is not None:
            skipped.append({**row, "reason": one_line(error)})
            continue
        try:
            image, original = decode_image_reduced(data, max_pixels=max_pixels, draft_size=draft,
                                                   reduce_over_limit=True)
            pixels = image_input(preset, image, job)
        except ImageDecodeError as exc:
            skipped.append({**row, "reason": one_line(exc.reason)})
            continue
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image, not a failed job
            skipped.append({**row, "reason": one_line(f"undecodable: {type(exc).__name__}: {exc}")})
            continue
        view = preset.view(image.size, size)
        if image.size != original:  # decoded reduced: the view in the original's pixels
            sx, sy = original[0] / image.size[0], original[1] / image.size[1]
            view = View(view.left * sx, view.top * sy, view.width * sx, view.height * sy)
        images.append(pixels)
        kept.append({**row, "width": original[0], "height": original[1], "view": view.as_tuple()})
        del image, pixels  # one decoded image at a time
    return PreparedShard(images.array(), kept, skipped).to_row(task)


def _keys_only(shard: ScanShard) -> list[str]:
    if shard.parquet is None:
        return shard_keys(shard)
    from workflows.pipelines.shards import Shard, read_shard

    return read_shard(Shard.from_dict(shard.parquet), columns=("source",)).column("source").to_pylist()


class ScanActor(ScoringActor):
    """Stage 2: the evaluate scoring actor (same caches), with scan's flags, regions and outputs."""

    def __call__(self, task: dict) -> dict:
        from workflows.pipelines.regions import heatmap_png, top_region
        from workflows.pipelines.scan_outputs import ScanStore, overlay_name, reason_key

        job = ScoringJob.from_json(task["job"])
        shard = ScanShard.from_dict(json.loads(task["shard"]))
        prepared = PreparedShard.from_row(task)
        kept, skipped = prepared.kept, prepared.skipped
        threshold = job.extra["thresholds"].get(shard.category)
        level, save_maps = float(job.extra["region_level"]), bool(job.extra["save_maps"])
        store = ScanStore(job.job_url)
        overlay = _OverlayRenderer(job, shard.category)
        scores, branches, regions, flags, maps, files = [], {}, [], [], [], {}

        def reduce_batch(start: int, stop: int, out) -> None:
            """Scores, regions, flags and overlays of one batch (on the background thread, in order)."""
            batch_scores = out.image_score.detach().float().cpu().numpy()
            anomaly_maps = out.anomaly_map.detach().float().cpu().numpy()
            scores.append(batch_scores)
            for name, value in out.branch_scores.items():
                branches.setdefault(name, []).append(value.detach().float().cpu().numpy())
            for i, row in enumerate(kept[start:stop]):
                regions.append(top_region(anomaly_maps[i], (row["width"], row["height"]), level=level,
                                          view=row["view"]))
                flagged = threshold is not None and float(batch_scores[i]) > threshold
                flags.append(flagged)
                if flagged and save_maps:
                    path = store.overlay_path(shard.category, overlay_name(row["source"], row["image_id"]))
                    files[path] = overlay(prepared.images[start + i], anomaly_maps[i],
                                          float(batch_scores[i]), row["source"])
                    maps.append({"image_id": row["image_id"], "source": row["source"],
                                 "heatmap_png": heatmap_png(anomaly_maps[i]), "overlay": path})

        self.score_shard(job, shard, prepared.images, reduce_batch)
        tables = {
            "results": _results(shard, kept, scores, branches, regions, flags, threshold),
            "skipped": _skipped(shard, skipped),
            "maps": _maps(shard, maps),
        }
        marker = {"shard_id": shard.shard_id, "category": shard.category, "dataset": shard.dataset,
                  "seen": len(kept) + len(skipped), "scored": len(kept), "skipped": len(skipped),
                  "flagged": int(sum(flags)), "overlays": len(files), "run_id": job.extra["run_id"],
                  "skip_reasons": dict(_count(reason_key(s["reason"]) for s in skipped))}
        store.commit(shard.category, shard.shard_id, tables, marker, files=files)
        return {"shard_id": shard.shard_id, "seen": marker["seen"], "flagged": marker["flagged"]}


class _OverlayRenderer:
    """Overlay PNG of one flagged image of a category: the category's threshold, its source and colour
    scale come from the job (`scan.overlay_scales`, recorded in summary.json)."""

    def __init__(self, job: ScoringJob, category: str) -> None:
        info = job.extra.get("overlays", {}).get(category) or {}
        self.category, self.mean, self.std = category, job.mean, job.std
        self.threshold, self.source = info.get("threshold"), info.get("source", "")
        self.limits = tuple(info["limits"]) if info.get("limits") else None

    def __call__(self, prepared: np.ndarray, anomaly_map: np.ndarray, score: float, source: str) -> bytes:
        """`prepared`: the image as it crossed Ray, uint8 pixels or normalised float32 [3, S, S]."""
        from workflows.reports.overlay import display_image, overlay_limits, overlay_png

        limits = self.limits or overlay_limits(self.threshold, None) or (float(anomaly_map.min()),
                                                                         float(anomaly_map.max()) + 1e-6)
        caption = [f"{self.category}: score {score:.4g} > threshold {self.threshold:.4g} ({self.source})",
                   source]
        return overlay_png(display_image(prepared, self.mean, self.std), anomaly_map, limits, caption,
                           marker=self.threshold)


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def _results(shard: ScanShard, kept, scores, branches, regions, flags, threshold):
    import pyarrow as pa

    values = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    columns = {
        "image_id": pa.array([r["image_id"] for r in kept], pa.string()),
        "source": pa.array([r["source"] for r in kept], pa.string()),
        "dataset": pa.array([shard.dataset] * len(kept), pa.string()),
        "category": pa.array([shard.category] * len(kept), pa.string()),
        "score": pa.array(values, pa.float32()),
        "flag": pa.array(flags, pa.bool_()),
        "threshold": pa.array([threshold] * len(kept), pa.float32()),
    }
    for name, parts in sorted(branches.items()):
        columns[f"score_{name}"] = pa.array(np.concatenate(parts), pa.float32())
    for field in ("x0", "y0", "x1", "y1"):
        columns[f"bbox_{field}"] = pa.array([getattr(r, field) for r in regions], pa.int32())
    columns["area_fraction"] = pa.array([r.area_fraction for r in regions], pa.float32())
    columns["width"] = pa.array([r["width"] for r in kept], pa.int32())
    columns["height"] = pa.array([r["height"] for r in kept], pa.int32())
    columns["shard_id"] = pa.array([shard.shard_id] * len(kept), pa.string())
    return pa.table(columns)


def _skipped(shard: ScanShard, skipped: list[dict]):
    import pyarrow as pa

    return pa.table({
        "image_id": pa.array([s["image_id"] for s in skipped], pa.string()),
        "source": pa.array([s["source"] for s in skipped], pa.string()),
        "dataset": pa.array([shard.dataset] * len(skipped), pa.string()),
        "category": pa.array([shard.category] * len(skipped), pa.string()),
        "reason": pa.array([s["reason"] for s in skipped], pa.string()),
        "shard_id": pa.array([shard.shard_id] * len(skipped), pa.string()),
    })


def _maps(shard: ScanShard, maps: list[dict]):
    import pyarrow as pa

    return pa.table({
        "image_id": pa.array([m["image_id"] for m in maps], pa.string()),
        "source": pa.array([m["source"] for m in maps], pa.string()),
        "category": pa.array([shard.category] * len(maps), pa.string()),
        "heatmap_png": pa.array([m["heatmap_png"] for m in maps], pa.binary()),
        "overlay": pa.array([m["overlay"] for m in maps], pa.string()),
        "shard_id": pa.array([shard.shard_id] * len(maps), pa.string()),
    })
