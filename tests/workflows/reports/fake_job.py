"""A committed evaluation job built without Ray: a tiny Parquet dataset (real skimage photo crops), then
per shard the same outputs the scoring actors commit (results, metric state, optional maps), with
synthetic anomaly maps whose image score is known in advance."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from residual_core.metrics import MetricAccumulator
from workflows.datasets.writer import write_dataset
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.shard_outputs import _results_table
from workflows.pipelines.shards import plan_shards, read_shard

SIZE = 40
MAP_SIZE = 32
# dataset -> (category, skimage photo, has masks)
LAYOUT = {"textures": ("brick", "brick", True), "elpv": ("mono", "camera", False)}
N_NORMAL, N_ANOMALOUS = 6, 5


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def source_index(source: str) -> int:
    """"brick/7.png" -> 7: normals are 0 .. N_NORMAL-1, anomalies the rest."""
    return int(source.rsplit("/", 1)[1].split(".")[0])


def known_score(source: str) -> float:
    """Image score by construction: normals 0.10 .. 0.60, anomalies 0.35 .. 0.95 (classes overlap)."""
    index = source_index(source)
    return 0.10 + 0.10 * index if index < N_NORMAL else 0.35 + 0.15 * (index - N_NORMAL)


def dataset_rows() -> list[dict]:
    from skimage import data

    rows = []
    rng = np.random.default_rng(0)
    for dataset, (category, photo, has_masks) in LAYOUT.items():
        image = getattr(data, photo)()
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        for i in range(N_NORMAL + N_ANOMALOUS):
            top, left = rng.integers(0, image.shape[0] - SIZE), rng.integers(0, image.shape[1] - SIZE)
            crop = np.ascontiguousarray(image[top:top + SIZE, left:left + SIZE]).astype(np.uint8)
            label = int(i >= N_NORMAL)
            mask = None
            if label:
                crop[8:20, 12:24] = 255
                if has_masks:
                    mask_array = np.zeros((SIZE, SIZE), np.uint8)
                    mask_array[8:20, 12:24] = 255
                    mask = _png(mask_array)
            rows.append({"dataset": dataset, "category": category, "split": "test", "label": label,
                         "defect_type": "patch" if label else "good", "image": _png(crop), "mask": mask,
                         "width": SIZE, "height": SIZE, "source": f"{photo}/{i}.png"})
    return rows


def _map(score: float, label: int) -> np.ndarray:
    """Low background, a bump on the defect square for anomalies; the max equals the image score."""
    grid = np.full((MAP_SIZE, MAP_SIZE), 0.05, np.float32)
    y, x = np.mgrid[0:MAP_SIZE, 0:MAP_SIZE]
    centre = (11, 14) if label else (24, 8)
    grid += (score - 0.05) * np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / 30.0).astype(np.float32)
    return grid


def build_job(data_url: str, job_url: str, *, save_maps: bool = True, shard_size: int = 4,
              maps_only_for: set[int] | None = None) -> None:
    """Write the dataset and a committed job: maps stored when ``save_maps``, for every image or only
    those whose source index is in ``maps_only_for`` (as ``evaluate.save_maps=sample`` does)."""
    from residual_core.images import decode_mask

    write_dataset(dataset_rows(), data_url)
    store = ShardStore(job_url)
    for shard in plan_shards(data_url, split="test", shard_size=shard_size):
        rows = read_shard(shard).to_pylist()
        scores = np.array([known_score(r["source"]) for r in rows], np.float32)
        labels = np.array([r["label"] for r in rows])
        maps = np.stack([_map(s, lab) for s, lab in zip(scores, labels, strict=True)])
        masks = np.zeros((len(rows), MAP_SIZE, MAP_SIZE), bool)
        has_mask = np.array([r["mask"] is not None for r in rows])
        for i, row in enumerate(rows):
            if row["mask"] is not None:
                mask = Image.fromarray(decode_mask(row["mask"]).astype(np.uint8) * 255)
                masks[i] = np.asarray(mask.resize((MAP_SIZE, MAP_SIZE), Image.Resampling.NEAREST)) > 127
        acc = MetricAccumulator()
        acc.update(scores, labels, maps, masks, has_mask)
        kept = [{k: r[k] for k in ("image_id", "label", "defect_type", "source")} for r in rows]
        results = _results_table(shard, kept, [], [scores], {})
        keep = [save_maps and (maps_only_for is None or source_index(r["source"]) in maps_only_for)
                for r in rows]
        stored = {r["image_id"]: m.astype(np.float16) for r, m, k in zip(rows, maps, keep, strict=True) if k}
        store.commit(shard, results, acc.state_dict(), stored, {"images": len(rows), "skipped": 0})
