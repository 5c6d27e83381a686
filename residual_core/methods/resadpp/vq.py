"""VQ codebooks of normal residuals and test-time feature distribution matching (models/vq.py, utils.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from residual_core.matching import knn

_ARGMIN_CHUNK = 16384  # rows per cdist block: bounds memory at chunk * num_embeddings


class ResidualCodebook(nn.Module):
    """One codebook [n_e, D] (models/vq.VectorQuantizer with legacy beta placement, no remap)."""

    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, dim)
        self.embedding.weight.data.uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)

    def nearest(self, vectors: Tensor) -> Tensor:
        """Index of the closest (L2) code for each row of [N, D]."""
        codes = self.embedding.weight
        return torch.cat([torch.cdist(block, codes).argmin(dim=1) for block in vectors.split(_ARGMIN_CHUNK)])

    def loss(self, normal_vectors: Tensor) -> Tensor:
        """mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2) on normal rows only; 0 when there are none."""
        if normal_vectors.numel() == 0:
            return normal_vectors.new_zeros(())  # nothing to learn from: no graph, no optimiser step
        quantized = self.embedding(self.nearest(normal_vectors.detach()))
        return torch.mean((quantized.detach() - normal_vectors) ** 2) + self.beta * torch.mean(
            (quantized - normal_vectors.detach()) ** 2
        )

    def quantize_map(self, features: Tensor) -> Tensor:
        """[B, C, H, W] -> nearest code per position, same shape (VectorQuantizer.get_condebook_entry).

        Scoring only: the code is found by the exact blocked search (`knn.nearest`, squared L2) rather than
        `cdist` + `argmin` (what training's `nearest` keeps, as the authors): the same code except where two
        codes are equally near to float rounding, several times faster (benchmarks/RESULTS.md)."""
        b, c, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, c)
        _, indices = knn.nearest(flat.detach(), self.embedding.weight.detach(), metric="l2")
        quantized = self.embedding(indices)
        return quantized.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


class MultiLevelVQ(nn.Module):
    """One codebook per feature level (models/vq.MultiScaleVQ / MultiScaleVQ4)."""

    def __init__(self, channels: Sequence[int], num_embeddings: int = 1536, beta: float = 0.25) -> None:
        super().__init__()
        self.levels = nn.ModuleList(ResidualCodebook(num_embeddings, c, beta) for c in channels)

    def loss(self, features: Sequence[Tensor], position_labels: Sequence[Tensor]) -> Tensor:
        """Sum over levels of the codebook loss on positions labelled normal (label 0).

        features: per level [B, C, H, W]; position_labels: per level [B, H, W] (0 normal, 1 anomalous,
        -1 unknown). Codebooks only ever see normal residuals.
        """
        total = None
        for codebook, feats, labels in zip(self.levels, features, position_labels, strict=True):
            flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
            term = codebook.loss(flat[labels.reshape(-1) == 0])
            total = term if total is None else total + term
        return total

    def quantize(self, features: Sequence[Tensor]) -> list[Tensor]:
        return [codebook.quantize_map(f) for codebook, f in zip(self.levels, features, strict=True)]


def match_feature_distribution(features: Tensor, reference: Tensor, alpha: float = 0.4) -> Tensor:
    """Exact feature distribution matching per (image, channel) (utils.applying_EFDM).

    Sorted values move towards the sorted reference values by (1 - alpha):
    out_sorted = x_sorted + (r_sorted - x_sorted) * (1 - alpha), then un-sorted back in place.
    alpha = 1 keeps the input; alpha = 0 copies the reference's value distribution.
    """
    weight = 1 - alpha
    b, c = features.shape[:2]
    flat = features.reshape(b, c, -1)
    sorted_input, order = torch.sort(flat)
    sorted_reference, _ = torch.sort(reference.reshape(b, c, -1))
    aligned = sorted_input + (sorted_reference - sorted_input) * weight
    # back in place: a scatter through the sort's permutation (the authors' gather by its argsort, no sort)
    return torch.empty_like(aligned).scatter_(-1, order, aligned).reshape(features.shape)
