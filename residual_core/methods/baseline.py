"""The plain nearest-neighbour baseline: 1-NN residual norm averaged over the chosen layers.

No training. For every query patch the nearest reference patch (cosine similarity on
L2-normalised features, the whole bank of the category) is subtracted; the norm of that
residual is the patch's anomaly score. Per-layer score grids are upsampled to the input size
and averaged; the image score is the maximum of the map.

Preprocessing (`preprocess`, a `residual_core.preprocess` preset) defaults to `res2clip`: the PIL
bicubic resize of the whole image to S x S, so no part of a non-square image is cropped away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from residual_core.matching import knn
from residual_core.matching.knn import BlockShape
from residual_core.methods.base import AnomalyMethod, MethodError, ScoreOutput
from residual_core.methods.registry import register_method
from residual_core.preprocess import PREPROCESS_NAMES

DEFAULT_PREPROCESS = "res2clip"


def nearest_residual_norm(query: Tensor, reference: Tensor, *, shape: BlockShape | None = None) -> Tensor:
    """For query rows [Q, D] and reference rows [N, D] (both normalised): ||q - nn(q)|| per row, [Q].

    nn(q) is the reference with the largest inner product (ties: the lowest index), found by the
    blocked exact search of `residual_core.matching.knn` (no [Q, N] matrix; `shape` overrides its
    block shape)."""
    if reference.shape[0] == 0:
        raise MethodError("the reference bank has no features for this layer")
    _, nearest = knn.nearest(query, reference, shape=shape)
    return (query - reference[nearest]).norm(dim=1)


class NearestNeighbourBaseline(AnomalyMethod):
    """Training-free 1-NN residual baseline (the reference point both papers improve on)."""

    name = "baseline"
    trainable = False

    def __init__(self, backbone, *, normalize: bool = True, preprocess: str = DEFAULT_PREPROCESS) -> None:
        super().__init__(backbone)
        self.normalize = bool(normalize)
        self.preprocess = baseline_preprocess({"preprocess": preprocess})

    def config_dict(self) -> dict:
        return {"normalize": self.normalize, "preprocess": self.preprocess}

    @torch.no_grad()
    def score(self, images: Tensor, bank) -> ScoreOutput:
        if images.ndim != 4:
            raise MethodError(f"images must be [B, 3, S, S], got shape {tuple(images.shape)}")
        features = self.backbone.forward_features(images.to(self.device))
        if len(features.patch_tokens) != len(bank.features):
            raise MethodError(
                f"backbone gives {len(features.patch_tokens)} layers but the bank holds {len(bank.features)}"
            )
        batch, size = images.shape[0], images.shape[-1]
        layer_maps = []
        for tokens, (rows, cols), reference in zip(
            features.patch_tokens, features.grids, bank.features, strict=True
        ):
            query = tokens.reshape(-1, tokens.shape[-1]).float()
            reference = reference.to(query.device).float()
            if self.normalize:
                query, reference = F.normalize(query, dim=-1), F.normalize(reference, dim=-1)
            scores = nearest_residual_norm(query, reference).reshape(batch, 1, rows, cols)
            layer_maps.append(F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False))
        anomaly_map = torch.stack(layer_maps).mean(dim=0)[:, 0]
        image_score = anomaly_map.flatten(1).amax(dim=1)
        return ScoreOutput(
            anomaly_map=anomaly_map.float(),
            image_score=image_score.float(),
            branch_scores={"visual": image_score.float()},
            branches=("visual",),
        )


def baseline_preprocess(params: dict) -> str:
    """The preset the baseline uses with keyword hyper-parameters `params`."""
    unknown = sorted(set(params) - {"normalize", "preprocess"})
    if unknown:
        raise MethodError(f"baseline: unknown config keys {unknown}")
    if not isinstance(params.get("normalize", True), bool):
        raise MethodError(f"baseline: normalize must be true or false, got {params['normalize']!r}")
    preprocess = params.get("preprocess", DEFAULT_PREPROCESS)
    if preprocess not in PREPROCESS_NAMES:
        raise MethodError(f"baseline: preprocess must be one of {PREPROCESS_NAMES}, got {preprocess!r}")
    return preprocess


@register_method("baseline", preprocess=baseline_preprocess)
def build_baseline(backbone, **config) -> NearestNeighbourBaseline:
    return NearestNeighbourBaseline(backbone, **config)
