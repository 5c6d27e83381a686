"""Connected components of ground-truth masks (8-connectivity, per image, one call per batch)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connectivity inside each image, no connection between images of the batch.
_PER_IMAGE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTIVITY[1] = True


def anomalous_pixel_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``masks`` bool [B, H, W] -> (region id of every anomalous pixel, sizes int64 [R + 1]).

    Region ids are 1..R, unique across the batch, listed in the flat (C) order of ``masks[masks]``;
    ``sizes[r]`` is the number of pixels of region r (``sizes[0]`` is unused and 0). Only images with an
    anomalous pixel are labelled, and no full-size label image is kept.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be [B, H, W], got shape {tuple(masks.shape)}")
    masks = masks.astype(bool, copy=False)
    with_regions = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1))
    if len(with_regions) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    subset = masks[with_regions]
    labelled, count = ndimage.label(subset, structure=_PER_IMAGE_8_CONNECTIVITY, output=np.int64)
    regions = labelled[subset]
    sizes = np.bincount(regions, minlength=count + 1).astype(np.int64)
    return regions, sizes
