"""ResAD's matching and residuals (the authors' `get_mc_matched_ref_features` / `get_residual_features`).

Each query position takes the reference feature with the highest cosine similarity (argmax of
normalised inner products) among all positions of all reference images of its class, per level,
found by the blocked exact search of `knn.py` (the [positions x references] matrix is never held).
The *raw* (unnormalised) reference feature is returned; the residual is f - p, or (f - p)^2 element
by element in the authors' "pos_flag" variant.
"""

from __future__ import annotations

import faiss
import torch

from residual_core import faiss_index
from residual_core.matching import knn
from residual_core.matching.engine import (
    DEFAULT_MAX_ELEMENTS,
    ReferenceSet,
    match,
)
from residual_core.matching.strategy import MatchStrategy

_NEAREST = MatchStrategy(weighting="nearest", penalty="", k_neighbors=1)


def nearest_reference_indices(
    features: torch.Tensor,
    reference: torch.Tensor,
    *,
    path: str = "torch",
    index: faiss.Index | None = None,
    max_elements: int | None = None,
) -> torch.Tensor:
    """For raw features [B, L, C] and raw references [N, C]: [B, L] index of the cosine-nearest reference.

    Argmax of the normalised inner products, as the authors compute it; "torch" runs the exact search of
    `knn.py` on its torch kernel (exact ties to the lowest index, like `torch.argmax`: FAISS's kernel
    would resolve them arbitrarily), "faiss" the candidate path. `max_elements` bounds a score block
    (None: the device's default, `knn.default_block_bytes`: on a GPU 4x the elements of the engine's
    default, so a batch's matching launches 4x fewer kernels).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [B, L, C], got shape {tuple(features.shape)}")
    normalised = faiss_index.normalise_rows(reference.float())
    query = faiss_index.normalise_rows(features.float())
    if path == "torch":
        budget = knn.default_block_bytes(query.device)
        if max_elements is not None:
            budget = min(budget, max_elements * query.element_size())
        return knn.nearest(query, normalised, block_bytes=budget, backend="torch")[1]
    result = match(
        query,
        ReferenceSet(normalised),
        _NEAREST,
        query_grid=(1, features.shape[1]),
        path=path,
        index=index,
        candidates=1,
        max_elements=max_elements or DEFAULT_MAX_ELEMENTS,
    )
    return result.nearest


def matched_reference_maps(
    feature_map: torch.Tensor,
    reference: torch.Tensor,
    *,
    path: str = "torch",
    index: faiss.Index | None = None,
) -> torch.Tensor:
    """ResAD layout: feature map [B, C, H, W], references [N, C] -> matched raw references [B, C, H, W]."""
    if feature_map.ndim != 4 or reference.ndim != 2 or reference.shape[1] != feature_map.shape[1]:
        raise ValueError(
            f"need a [B, C, H, W] map and [N, C] references with the same C; got "
            f"{tuple(feature_map.shape)} and {tuple(reference.shape)}"
        )
    batch, channels, height, width = feature_map.shape
    tokens = feature_map.flatten(2).transpose(1, 2)
    nearest = nearest_reference_indices(tokens, reference, path=path, index=index)
    return reference[nearest].view(batch, height, width, channels).permute(0, 3, 1, 2)


def residual(features: torch.Tensor, matched: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
    """f - p, or the element-wise squared error (f - p)^2 (ResAD's pos_flag=True)."""
    if features.shape != matched.shape:
        raise ValueError(
            f"residual needs equal shapes, got {tuple(features.shape)} and {tuple(matched.shape)}"
        )
    difference = features - matched
    return difference * difference if squared else difference
