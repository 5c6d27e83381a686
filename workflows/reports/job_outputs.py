"""Read what an evaluation job committed (see ``workflows.pipelines.shards.ShardStore``), for reports.

Only bounded things are read on the driver: per-shard metric states (binned counts), per-image result
rows one shard at a time, the few stored anomaly maps a gallery shows, and those images' originals
(read from just the shard of the dataset that holds them).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np

from workflows import storage
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.shards import Shard, read_shard

RESULT_COLUMNS = ("image_id", "label", "image_score", "status", "defect_type", "source")


def shards_by_category(job_url: str) -> dict[str, list[Shard]]:
    """Committed shards of the job, grouped as "dataset/category" -> shards (sorted by shard id)."""
    store = ShardStore(job_url)
    grouped: dict[str, list[Shard]] = {}
    for shard_id in sorted(store.done_ids()):
        shard = Shard.from_dict(store.summary(shard_id)["shard"])
        grouped.setdefault(f"{shard.dataset}/{shard.category}", []).append(shard)
    return dict(sorted(grouped.items()))


def merged_accumulator(job_url: str, shards: Iterable[Shard]):
    """The category's ``MetricAccumulator``: the shards' states merged one at a time."""
    from workflows.pipelines.metric_groups import category_accumulator

    store = ShardStore(job_url)
    total = None
    for shard in shards:
        state = category_accumulator(store.state(shard.shard_id))  # all groups of the shard
        total = state if total is None else total.merge(state)
    if total is None:
        raise ValueError(f"{storage.redact(job_url)}: no committed shards to merge")
    return total


def read_results(job_url: str, shard: Shard):
    """One shard's per-image results (only the columns reports use, where present)."""
    import pyarrow.parquet as pq

    data = storage.read_bytes(storage.join(job_url, "results", f"{shard.shard_id}.parquet"))
    parquet = pq.ParquetFile(io.BytesIO(data))
    present = [c for c in RESULT_COLUMNS if c in parquet.schema_arrow.names]
    return parquet.read(columns=present)


def _maps_url(job_url: str, shard_id: str) -> str:
    return storage.join(job_url, "maps", f"{shard_id}.npz")


def stored_map_ids(job_url: str, shard_id: str) -> set[str]:
    """Ids of the images whose anomaly map the shard stored (reads the archive's index, not the maps)."""
    url = _maps_url(job_url, shard_id)
    if not storage.exists(url):
        return set()
    with storage.open_url(url) as handle, np.load(handle) as archive:
        return set(archive.files)


def load_maps(job_url: str, shard_id: str, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """The stored maps (float32 [S, S]) of ``image_ids`` from one shard's archive."""
    wanted = set(image_ids)
    with storage.open_url(_maps_url(job_url, shard_id)) as handle, np.load(handle) as archive:
        return {name: np.asarray(archive[name], dtype=np.float32) for name in archive.files if name in wanted}


def load_originals(shard: Shard, image_ids: Iterable[str], size: tuple[int, int] | None,
                   preprocess: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """image id -> (RGB uint8 [H, W, 3], mask bool [H, W] or None) for the ids in ``shard``: with a
    square ``size`` (S, S) and the job's ``preprocess`` preset, exactly the model's view (a centre crop
    for ``resad``) and the mask as it was scored; with a ``size`` only, the whole image resized to it;
    at most 256 px on the long side when ``size`` is None."""
    from PIL import Image

    from residual_core.images import decode_image, decode_mask

    preset = None
    if preprocess is not None and size is not None and size[0] == size[1]:
        from residual_core.preprocess import get_preprocess

        preset = get_preprocess(preprocess)
    wanted = set(image_ids)
    table = read_shard(shard, columns=("image_id", "image", "mask"))
    out = {}
    for row in table.to_pylist():
        if row["image_id"] not in wanted:
            continue
        image = decode_image(row["image"])
        mask = decode_mask(row["mask"], image.size) if row["mask"] is not None else None
        if preset is not None:
            shown = None if mask is None else preset.mask_array(mask, size[0])
            out[row["image_id"]] = (preset.display(image, size[0]), shown)
            continue
        target = (size[1], size[0]) if size else _thumbnail_size(image.size, 256)
        resized = np.asarray(image.resize(target, Image.Resampling.BICUBIC), dtype=np.uint8)
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
                target, Image.Resampling.NEAREST)) > 127
        out[row["image_id"]] = (resized, mask)
    return out


def _thumbnail_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    width, height = size
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def job_preprocess(job_url: str) -> str | None:
    """The preprocessing preset the job's images went through (its committed metrics.json;
    "torch-bicubic" for jobs evaluated before presets existed); None without a metrics.json."""
    url = storage.join(job_url, "metrics.json")
    if not storage.exists(url):
        return None
    return storage.read_json(url).get("preprocess", "torch-bicubic")


def job_title(job_url: str) -> str:
    """"method k=K seed=S" from the job's committed metrics.json (empty when it is not there)."""
    url = storage.join(job_url, "metrics.json")
    if not storage.exists(url):
        return ""
    spec = storage.read_json(url).get("spec", {})
    method = spec.get("method", {}).get("name", "")
    return f"{method} k={spec.get('k_shot')} seed={spec.get('seed')}" if method else ""
