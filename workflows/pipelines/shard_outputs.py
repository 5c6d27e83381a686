"""One shard's products as the scoring actor and the per-category reduce build and commit them: per-image
and per-branch scores, saved maps, and the metric state (a `GroupedAccumulator`: the normals and each
defect type apart, `metric_groups`); and the raw outputs of set-normalised methods (`pack_raw`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from workflows.pipelines.commits import ShardStore
from workflows.pipelines.metric_groups import group_of
from workflows.pipelines.shards import Shard

if TYPE_CHECKING:
    from workflows.pipelines.scoring import ScoringJob


def _sampled(image_id: str, fraction: float) -> bool:
    """Deterministic per-image sample (same images whatever the shards or actors)."""
    return int(image_id[:8], 16) / 0xFFFFFFFF < fraction


class ShardOutputs:
    """One shard's products, batch by batch: metric accumulators (one per group: the normals, each
    defect type; `metric_groups`), per-image and per-branch scores and maps. The scoring actor fills it
    from `method.score`, the per-category reduce of set-normalised methods from `normaliser.finish`;
    both commit it the same way."""

    def __init__(self, job: ScoringJob, kept: list[dict]) -> None:
        from residual_core.metrics import GroupedAccumulator

        self.job, self.kept = job, kept
        self.accumulator = GroupedAccumulator(pixel=True)  # groups: metric_groups.group_of(label, defect)
        self.image_scores: list[np.ndarray] = []
        self.branch_scores: dict[str, list[np.ndarray]] = {}
        self.maps: dict[str, np.ndarray] = {}

    def add(self, start: int, out, masks: np.ndarray) -> None:
        """The ScoreOutput of kept rows [start, start + B) with their masks [B, S, S] (uint8/bool)."""
        import torch

        rows = self.kept[start:start + len(out.image_score)]
        scores = out.image_score.detach().float().cpu()
        anomaly_maps = out.anomaly_map.detach().float()
        self.image_scores.append(scores.numpy())
        for name, value in out.branch_scores.items():
            self.branch_scores.setdefault(name, []).append(value.detach().float().cpu().numpy())
        groups = {i: group_of(row["label"], row["defect_type"])
                  for i, row in enumerate(rows) if row["label"] is not None}
        labelled = sorted(groups, key=groups.__getitem__)  # by group: each group's maps a view, not a copy
        if labelled:
            index = torch.tensor(labelled)
            self.accumulator.update(
                [groups[i] for i in labelled],
                scores[index],
                torch.tensor([rows[i]["label"] for i in labelled]),
                anomaly_maps[index.to(anomaly_maps.device)],  # on a GPU actor reduced there (same state)
                torch.from_numpy(np.asarray(masks[: len(rows)])).bool()[index],
                torch.tensor([rows[i]["has_mask"] for i in labelled]),
            )
        if self.job.save_maps != "none":
            for i, row in enumerate(rows):
                if self.job.save_maps == "all" or _sampled(row["image_id"], self.job.map_sample_fraction):
                    self.maps[row["image_id"]] = anomaly_maps[i].cpu().numpy().astype(self.job.map_dtype)

    def commit(self, store: ShardStore, shard: Shard, skipped: list[dict], summary: dict,
               raw: dict[str, np.ndarray] | None = None) -> None:
        """The actor's commit: outputs, raw outputs when given, then the shard's marker."""
        results = _results_table(shard, self.kept, skipped, self.image_scores, self.branch_scores)
        store.commit(shard, results, self.accumulator.state_dict(), self.maps, summary, raw)

    def rewrite(self, store: ShardStore, shard: Shard, skipped: list[dict]) -> None:
        """The reduce step's write: a committed shard's results, state and maps, finished."""
        results = _results_table(shard, self.kept, skipped, self.image_scores, self.branch_scores)
        store.write_outputs(shard.shard_id, results, self.accumulator.state_dict(), self.maps)


def pack_raw(arrays: dict[str, np.ndarray], masks: np.ndarray, kept: list[dict], skipped: list[dict]
             ) -> dict[str, np.ndarray]:
    """A shard's raw outputs as one npz-ready dict: `raw.<name>` arrays, bit-packed masks and the rows."""
    packed = {f"raw.{name}": value for name, value in arrays.items()}
    packed["masks"] = np.packbits(np.asarray(masks, dtype=bool), axis=-1)
    packed["mask_width"] = np.asarray(np.shape(masks)[-1])
    packed["rows"] = np.frombuffer(json.dumps({"kept": kept, "skipped": skipped}).encode(), np.uint8)
    return packed


def unpack_raw(packed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray, list, list]:
    """(raw arrays by name, masks [N, S, S] uint8, kept rows, skipped rows) of `pack_raw`'s output."""
    arrays = {key[4:]: value for key, value in packed.items() if key.startswith("raw.")}
    width = int(packed["mask_width"])
    masks = np.unpackbits(packed["masks"], axis=-1, count=width)
    rows = json.loads(bytes(packed["rows"]).decode())
    return arrays, masks, rows["kept"], rows["skipped"]


def _results_table(shard: Shard, kept: list[dict], skipped: list[dict], image_scores, branch_scores):
    import pyarrow as pa

    scores = np.concatenate(image_scores) if image_scores else [None] * len(kept)  # None: not yet finished
    rows = kept + skipped
    columns = {
        "image_id": [r["image_id"] for r in rows],
        "dataset": [shard.dataset] * len(rows),
        "category": [shard.category] * len(rows),
        "label": pa.array([r["label"] for r in rows], pa.int8()),
        "defect_type": pa.array([r["defect_type"] for r in rows], pa.string()),
        "source": [r["source"] for r in rows],
        "image_score": pa.array([None if v is None else float(v) for v in scores] + [None] * len(skipped),
                                pa.float32()),
        "status": ["scored"] * len(kept) + ["skipped"] * len(skipped),
        "skip_reason": pa.array([None] * len(kept) + [r["skip_reason"] for r in skipped], pa.string()),
        "shard_id": [shard.shard_id] * len(rows),
    }
    for name, parts in sorted(branch_scores.items()):
        values = np.concatenate(parts).astype(float)
        columns[f"score_{name}"] = pa.array(list(values) + [None] * len(skipped), pa.float32())
    return pa.table(columns)


