"""Score a few images in this process, without Ray: `predict`, and the maps galleries recompute.

The scores and maps are the evaluate pipeline's: the same `ScoringJob` (backbone, method, checkpoint,
preset, image size and normalisation), the same preprocessing calls as `scoring.prepare_shard`, the
same model and bank loading and the same batch loop (`ScoringActor.batches_against`, an actor object
used in-process). Methods whose maps need whole-set statistics (ResAD++'s default `test_set`
normalisation) are finished with the constants the evaluate job's reduce step stored for the category
(`reduced/<dataset>=<category>.json`); without such constants (`predict`) they run in the method's
batch-independent mode (`method.score`, as `scan` does), and `LocalScores.mode` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from workflows.pipelines.scoring import ScoringActor, ScoringJob

MODE_PER_BATCH = "exactly as evaluate (the method needs no whole-set statistics)"
MODE_SET_CONSTANTS = "set-normalised with the job's stored per-category constants"
MODE_BATCH_INDEPENDENT = "batch-independent (method.score, as scan; no whole-set normalisation)"


@dataclass
class LocalScores:
    """Per-image results of `LocalScorer.score`, in the order of the images given."""

    scores: np.ndarray  # [N] float32
    maps: np.ndarray  # [N, S, S] float32, at the model's input size
    branch_scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N]
    mode: str = MODE_PER_BATCH


class LocalScorer:
    """One configured method on this process's device; models and banks cached like an actor's."""

    def __init__(self, job: ScoringJob, *, batch_size: int = 8) -> None:
        self.job = job
        self.actor = ScoringActor(batch_size=batch_size)  # scores without gradients, leaves grad mode alone

    @property
    def device(self) -> str:
        return self.actor._device(self.job)

    @property
    def method(self):
        return self.actor._method(self.job)

    def prepare(self, images) -> np.ndarray:
        """PIL images -> [N, 3, S, S] normalised float32: the model input `scoring.prepare_shard` gives,
        bit for bit (it may carry 8-bit pixels to the actor, normalised there: `prepared.py`)."""
        from residual_core.preprocess import get_preprocess

        job = self.job
        preset = get_preprocess(job.preprocess)
        size = job.image_size
        if not images:
            return np.zeros((0, 3, size, size), np.float32)
        return np.stack([preset.image(image, size, tuple(job.mean), tuple(job.std)).numpy()
                         for image in images])

    def load_bank(self, url: str):
        """A committed bank (as the scoring actor loads it)."""
        return self.actor.bank_at(url, self.device)

    def build_bank(self, references: np.ndarray, *, image_ids: list[str], dataset: str, category: str,
                   seed: int):
        """A bank of prepared reference images [K, 3, S, S], built as `index.build_bank_task` builds one
        (kept in memory, not stored)."""
        import torch

        from residual_core.bank import build_bank

        backbone = self.method.backbone
        images = torch.from_numpy(references).to(next(backbone.parameters()).device)
        with torch.no_grad():
            return build_bank(backbone, images, dataset=dataset, category=category, seed=seed,
                              image_ids=list(image_ids))

    def score(self, images: np.ndarray, bank, *, set_record: dict | None = None) -> LocalScores:
        """Scores and maps of prepared images against `bank`. `set_record`: a category's reduce record
        (`{"normaliser": ..., "statistics": ...}`) for set-normalised methods."""
        import torch

        with torch.no_grad():
            return self._score(images, bank, set_record)

    def _score(self, images: np.ndarray, bank, set_record: dict | None) -> LocalScores:
        from residual_core.methods.set_normalisation import normaliser_from_dict

        size = self.job.image_size
        if len(images) == 0:
            return LocalScores(np.zeros(0, np.float32), np.zeros((0, size, size), np.float32))
        normaliser = self.method.set_normaliser()
        if normaliser is not None and set_record is not None:
            finisher, stats = normaliser_from_dict(set_record["normaliser"]), set_record["statistics"]
            outputs = [finisher.finish({k: v.detach().float().cpu() for k, v in raw.items()}, stats)
                       for _, _, raw in self.actor.batches_against(self.job, bank, images, raw=True)]
            mode = MODE_SET_CONSTANTS
        else:
            outputs = [out for _, _, out in self.actor.batches_against(self.job, bank, images)]
            mode = MODE_PER_BATCH if normaliser is None else MODE_BATCH_INDEPENDENT
        branches: dict[str, list[np.ndarray]] = {}
        for out in outputs:
            for name, value in out.branch_scores.items():
                branches.setdefault(name, []).append(value.detach().float().cpu().numpy())
        return LocalScores(
            scores=np.concatenate([o.image_score.detach().float().cpu().numpy() for o in outputs]),
            maps=np.concatenate([o.anomaly_map.detach().float().cpu().numpy() for o in outputs]),
            branch_scores={name: np.concatenate(parts) for name, parts in branches.items()},
            mode=mode,
        )
