"""Connected components of ground-truth masks (8-connectivity, per image, one call per batch).

Two ways to the same region ids: ``anomalous_pixel_regions`` labels a batch of binary masks where they
are reduced; or ``label_regions`` numbers each image's regions once, where the masks are decoded (the
scoring pipeline's CPU tasks), and ``labelled_pixel_regions`` turns a batch of those labels into the same
ids on any device (a GPU actor's reduction then does no labelling on its CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

# 8-connectivity inside each image, no connection between images of the batch.
_PER_IMAGE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTIVITY[1] = True
MAX_UINT8_LABEL = 255  # label images travel as uint8 while no image has more regions


def _check_batch(masks) -> None:
    if masks.ndim != 3:
        raise ValueError(f"masks must be [B, H, W], got shape {tuple(masks.shape)}")


def anomalous_pixel_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``masks`` bool [B, H, W] -> (region id of every anomalous pixel, sizes int64 [R + 1]).

    Region ids are 1..R, unique across the batch, listed in the flat (C) order of ``masks[masks]``;
    ``sizes[r]`` is the number of pixels of region r (``sizes[0]`` is unused and 0). Only images with an
    anomalous pixel are labelled, and no full-size label image is kept. Ids follow the raster order of
    each region's first pixel (scipy's labelling order), image after image.
    """
    _check_batch(masks)
    masks = masks.astype(bool, copy=False)
    with_regions = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1))
    if len(with_regions) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    subset = masks[with_regions]
    labelled, count = ndimage.label(subset, structure=_PER_IMAGE_8_CONNECTIVITY, output=np.int64)
    regions = labelled[subset]
    sizes = np.bincount(regions, minlength=count + 1).astype(np.int64)
    return regions, sizes


def label_regions(masks: np.ndarray) -> np.ndarray:
    """``masks`` bool [B, H, W] -> each image's regions numbered 1..r in the raster order of their first
    pixel (0: normal pixels); uint8 while no image has over ``MAX_UINT8_LABEL`` regions (the bytes of a
    0/1 mask), else int32. ``labelled_pixel_regions`` of the result equals ``anomalous_pixel_regions`` of
    the masks."""
    _check_batch(masks)
    masks = masks.astype(bool, copy=False)
    with_regions = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)) if masks.size else []
    if len(with_regions) == 0:
        return np.zeros(masks.shape, dtype=np.uint8)
    subset = masks[with_regions]
    labelled, _ = ndimage.label(subset, structure=_PER_IMAGE_8_CONNECTIVITY, output=np.int32)
    # the batch's labels run image after image: an image's first label follows the earlier images' last
    last = labelled.reshape(len(subset), -1).max(axis=1)
    earlier = np.concatenate([[0], last[:-1]]).astype(np.int32)
    np.subtract(labelled, earlier[:, None, None], out=labelled, where=subset)
    most = int((last - earlier).max())
    out = np.zeros(masks.shape, dtype=np.uint8 if most <= MAX_UINT8_LABEL else np.int32)
    out[with_regions] = labelled
    return out


def labelled_pixel_regions(labels):
    """``label_regions`` output [B, H, W] (numpy, or a tensor on any device) -> (region id of every
    anomalous pixel, sizes int64 [R + 1], regions per image [B]), as numpy or tensors where the labels
    are: ``anomalous_pixel_regions``'s ids and sizes, by offsetting each image's labels by the earlier
    images' regions (a few vector operations: no labelling)."""
    _check_batch(labels)
    if isinstance(labels, torch.Tensor):
        return _labelled_pixel_regions_torch(labels)
    flat = labels.reshape(labels.shape[0], -1)
    anomalous = flat > 0
    per_image = flat.max(axis=1, initial=0).astype(np.int64)
    earlier = np.cumsum(per_image) - per_image
    region = flat[anomalous].astype(np.int64) + np.repeat(earlier, np.count_nonzero(anomalous, axis=1))
    return region, np.bincount(region, minlength=int(per_image.sum()) + 1).astype(np.int64), per_image


def _labelled_pixel_regions_torch(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1) if labels.numel() else labels.new_zeros(batch, 1)
    anomalous = flat > 0
    per_image = flat.amax(dim=1).to(torch.int64)
    earlier = torch.cumsum(per_image, 0) - per_image
    region = flat[anomalous].to(torch.int64) + torch.repeat_interleave(earlier, anomalous.sum(dim=1))
    return region, torch.bincount(region, minlength=int(per_image.sum()) + 1), per_image
