"""A backbone stand-in for method tests: patch features are 2x2-pooled pixels (layer 0) and 4x4-pooled
pixels (layer 1), offset by 1 so no feature is zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from residual_core.backbones import BackboneFeatures
from residual_core.backbones.base import BackboneIdentity


class PooledPixels(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.identity = BackboneIdentity(name="pooled-pixels", weights_sha256="", layers=(0, 1),
                                         image_size=32)

    def forward_features(self, images):
        tokens, grids = [], []
        for pool in (2, 4):
            pooled = F.avg_pool2d(images, pool)
            grids.append(tuple(pooled.shape[-2:]))
            tokens.append(pooled.flatten(2).transpose(1, 2) + 1.0)
        return BackboneFeatures(patch_tokens=tokens, grids=grids, global_embedding=None)
