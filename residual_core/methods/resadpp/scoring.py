"""Anomaly maps from per-level flow outputs, merged as validate.py does, smoothing and normalisation.

Two normalisations of the per-level log-likelihoods (`ResADppConfig.score_normalisation`):
- `test_set` (the authors', default for evaluation): `TestSetNormaliser`, statistics of every
  evaluated image of the category (a pipeline finishes the maps in a per-category reduce step);
- `training` (streaming, used by `scan` and `method.score`): per-level offsets fixed after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from residual_core.methods.base import ScoreOutput
from residual_core.methods.filters import gaussian_blur
from residual_core.methods.set_normalisation import BatchSource, RawBatch, register_normaliser

BRANCHES = ("likelihood", "boundary")  # validate.py scores1 (log-likelihood) and scores2 (BScores)


def upsample(maps: Tensor, size: int) -> Tensor:
    """[B, h, w] -> [B, size, size], bilinear with align_corners=True (validate.py)."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True).squeeze(1)


def normal_map(logp_maps: Sequence[Tensor], logp_offsets: Tensor, size: int) -> Tensor:
    """sum_l up(exp(logp_l - m_l)): the merged normality map before the flip (validate.py)."""
    return sum(upsample(torch.exp(lp - logp_offsets[i]), size) for i, lp in enumerate(logp_maps))


def likelihood_anomaly_map(
    logp_maps: Sequence[Tensor], logp_offsets: Tensor, size: int, sigma: float, flip: float | None = None
) -> Tensor:
    """validate.convert_to_anomaly_scores: flip - sum_l up(exp(logp_l - m_l)), smoothed.

    With the authors' normalisation m_l is each level's maximum over the whole evaluated set and
    `flip` the set's maximum of the summed map (`TestSetNormaliser`). In the streaming mode m_l is a
    per-level constant calibrated after training (`ResADpp.calibrate_offsets`) and `flip` is L (the
    number of levels), so scores do not depend on the batch. A constant `flip` shifts every map of a
    category equally: no metric changes.
    """
    normal = normal_map(logp_maps, logp_offsets, size)
    return gaussian_blur((len(logp_maps) if flip is None else flip) - normal, sigma)


def boundary_anomaly_map(anomaly_prob_maps: Sequence[Tensor], size: int, sigma: float) -> Tensor:
    """validate.aggregate_anomaly_scores: mean over levels of up(softmax([logp_n, logp_a])[1]), smoothed."""
    mean = sum(upsample(p, size) for p in anomaly_prob_maps) / len(anomaly_prob_maps)
    return gaussian_blur(mean, sigma)


def image_scores(anomaly_map: Tensor) -> Tensor:
    """Image score = maximum of the map (calculate_metrics with only_max_value=True: top-1 mean)."""
    return anomaly_map.flatten(1).max(dim=1).values


def merged_output(logp_maps: Sequence[Tensor], prob_maps: Sequence[Tensor], logp_offsets: Tensor, size: int,
                  sigma: float, flip: float | None = None, branch: str = "both") -> ScoreOutput:
    """validate.py's final maps: (likelihood + boundary) / 2, image score = max of each map.

    `branch` "likelihood" or "boundary" (an ablation) makes that branch's map the anomaly map."""
    likelihood = likelihood_anomaly_map(logp_maps, logp_offsets, size, sigma, flip)
    boundary = boundary_anomaly_map(prob_maps, size, sigma)
    if branch == "likelihood":
        merged = likelihood
    elif branch == "boundary":
        merged = boundary
    elif branch == "both":
        merged = (likelihood + boundary) / 2
    else:
        raise ValueError(f"branch must be 'both', 'likelihood' or 'boundary', got {branch!r}")
    return ScoreOutput(
        anomaly_map=merged.float(),
        image_score=image_scores(merged).float(),
        branch_scores={"likelihood": image_scores(likelihood).float(),
                       "boundary": image_scores(boundary).float()},
        branches=BRANCHES,
    )


def raw_batch(logp_maps: Sequence[Tensor], prob_maps: Sequence[Tensor]) -> RawBatch:
    """Per-level (normal log-likelihood, anomaly probability) maps at feature resolution, by name."""
    raw = {f"logp_{level}": lp for level, lp in enumerate(logp_maps)}
    raw.update({f"prob_{level}": p for level, p in enumerate(prob_maps)})
    return raw


def _levels(raw: RawBatch, levels: int, name: str) -> list[Tensor]:
    return [raw[f"{name}_{level}"].float() for level in range(levels)]


@register_normaliser
@dataclass(frozen=True)
class TestSetNormaliser:
    """The authors' normalisation (validate.py): per level, subtract the maximum log-likelihood over
    every evaluated image of the category; flip with the set's maximum of the summed normality map."""

    kind: ClassVar[str] = "resadpp-test-set"
    levels: int
    size: int
    sigma: float
    branch: str = "both"

    def statistics(self, batches: BatchSource) -> dict[str, Any]:
        maxima = None
        for raw in batches():  # pass 1: m_l = max over the set of each level's log-likelihoods
            batch = torch.stack([lp.amax() for lp in _levels(raw, self.levels, "logp")])
            maxima = batch if maxima is None else torch.maximum(maxima, batch)
        if maxima is None:
            return {"logp_max": [], "flip": None}
        flip = None
        for raw in batches():  # pass 2: the flip constant = max of the summed normality map
            value = float(normal_map(_levels(raw, self.levels, "logp"), maxima, self.size).amax())
            flip = value if flip is None else max(flip, value)
        return {"logp_max": maxima.tolist(), "flip": flip}

    def finish(self, raw: RawBatch, stats: dict[str, Any]) -> ScoreOutput:
        offsets = torch.tensor(stats["logp_max"], dtype=torch.float32)
        return merged_output(_levels(raw, self.levels, "logp"), _levels(raw, self.levels, "prob"), offsets,
                             self.size, self.sigma, flip=stats["flip"], branch=self.branch)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": self.levels, "size": self.size, "sigma": self.sigma,
                "branch": self.branch}
