"""``MetricAccumulator``: streaming, mergeable image and pixel metrics for one (category, run).

State is two ``CollapsingHistogram``s (image scores, pixel scores) plus integer counts, so memory is
bounded by the capacities whatever the number of images, the state is plain numpy/python (it travels
between Ray workers) and merging shards in any order gives the same state as one pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from residual_core.metrics import curves
from residual_core.metrics.device_fold import DeviceFold
from residual_core.metrics.encoding import (
    FLOAT32_ZERO_BITS,
    as_float_array,
    encode_numpy,
    encode_torch,
    shift_keys,
)
from residual_core.metrics.histogram import OVERLAP_BITS, CollapsingHistogram
from residual_core.metrics.reduce import reduce_anomalous, reduce_numpy, reduce_torch_bins
from residual_core.metrics.regions import anomalous_pixel_regions

STATE_VERSION = 2  # 2: float64 keys, capacity counts distinct scores, compact arrays; 1 still read
READABLE_VERSIONS = (1, 2)
VERSION_1_PIXEL_CAPACITY = 1 << 20  # version 1's default, read as today's so that resumed jobs merge
IMAGE_METRICS = ("I-AUROC", "I-AP", "I-F1max")


def pixel_metric_names(aupro_limit: float = 0.3) -> tuple[str, ...]:
    return ("P-AUROC", "P-AP", "P-F1max", f"AUPRO@{aupro_limit:g}")


@dataclass(frozen=True)
class AccumulatorConfig:
    pixel: bool = True
    aupro_limit: float = 0.3
    pixel_capacity: int = 1 << 21  # distinct scores kept exactly (see docs/metrics.md, "Memory")
    image_capacity: int = 1 << 16


@dataclass
class SampleCounts:
    images: int = 0
    normal_images: int = 0
    anomalous_images: int = 0
    images_without_mask: int = 0  # counted for image metrics only
    anomalous_images_with_empty_mask: int = 0
    regions: int = 0

    def __add__(self, other: SampleCounts) -> SampleCounts:
        return SampleCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def _to_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.dtype == torch.bfloat16:  # numpy has no bfloat16 (autocast output); bf16 -> fp32 is exact
            values = values.float()
        return values.cpu().numpy()
    return np.asarray(values)


def _binary_masks(masks, name: str) -> np.ndarray:
    masks = _to_numpy(masks, name)
    return masks if masks.dtype == bool else masks > 0.5


def _reduces_on_device(maps) -> bool:
    """Whether a batch's pixels are reduced and folded where its maps are: a CUDA (any non-CPU) tensor
    stays on its device, and only each histogram's compact folded bins reach the host."""
    return isinstance(maps, torch.Tensor) and maps.device.type != "cpu"


def _squeeze_channel(array, name: str):
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must be [B, H, W] or [B, 1, H, W], got shape {tuple(array.shape)}")
    return array


def _error_bounds(bins: curves.CurveBins, c: curves.CumulativeCounts, names: tuple[str, ...],
                  regions: int | None, limit: float) -> dict[str, float]:
    """Certified worst-case error per metric: 0 while every bin is one float64 value (shift 0), except
    AUPRO's fixed-point overlap (below 2**-32 at every threshold)."""
    if bins.shift == 0:
        bounds = dict.fromkeys(names, 0.0)
    else:
        values = curves.error_bounds(c, regions, limit)
        bounds = dict(zip(names, (values[k] for k in ("auroc", "ap", "f1max", "aupro")), strict=False))
    if regions:
        bounds[names[3]] += 2.0**-OVERLAP_BITS
    return bounds


class MetricAccumulator:
    """Accumulates (image score, label, anomaly map, mask) batches; ``compute()`` gives the metrics."""

    def __init__(self, pixel: bool = True, aupro_limit: float = 0.3, pixel_capacity: int = 1 << 21,
                 image_capacity: int = 1 << 16) -> None:
        if not 0.0 < aupro_limit <= 1.0:
            raise ValueError(f"aupro_limit must be in (0, 1], got {aupro_limit}")
        self.config = AccumulatorConfig(pixel, float(aupro_limit), int(pixel_capacity), int(image_capacity))
        self.counts = SampleCounts()
        self.image_hist = CollapsingHistogram(self.config.image_capacity)
        self.pixel_hist = CollapsingHistogram(self.config.pixel_capacity)

    @property
    def pixel_hist(self) -> CollapsingHistogram:
        """The pixel histogram, with the batches still folding on a device handed to it first."""
        pending = self._device_pixels.take() if self._device_pixels is not None else None
        if pending is not None:
            self._pixel_hist.add(*pending)
        return self._pixel_hist

    @pixel_hist.setter
    def pixel_hist(self, histogram: CollapsingHistogram) -> None:
        self._pixel_hist = histogram
        self._device_pixels: DeviceFold | None = None  # created by the first batch of device maps

    def __getstate__(self) -> dict:
        """Pickled with everything on the host (no device tensors travel)."""
        state = dict(self.__dict__, _pixel_hist=self.pixel_hist)
        state["_device_pixels"] = None
        return state

    # -- accumulation -------------------------------------------------------------------------------
    def update(self, image_scores, labels, anomaly_maps=None, masks=None, has_mask=None) -> None:
        """Add a batch. Images with ``has_mask`` False (or no ``masks`` at all) count for image metrics only.

        ``image_scores`` [B]; ``labels`` [B] in {0, 1}; ``anomaly_maps`` [B, H, W] (numpy or torch; a CUDA
        tensor is reduced on its device); ``masks`` [B, H, W] bool or {0, 1}; ``has_mask`` [B] bool.
        """
        scores = as_float_array(image_scores, "image_scores").reshape(-1)
        labels = _to_numpy(labels, "labels").reshape(-1)
        batch = scores.shape[0]
        if labels.shape[0] != batch:
            raise ValueError(f"labels has {labels.shape[0]} entries for {batch} image scores")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got {np.unique(labels).tolist()}")
        anomalous = labels.astype(bool)
        image_shift = self.image_hist.shift
        keys = shift_keys(encode_numpy(scores, "image_scores"), image_shift)
        image_part = reduce_numpy(keys, anomalous, image_shift)
        added = SampleCounts(images=batch, normal_images=int((~anomalous).sum()),
                             anomalous_images=int(anomalous.sum()))
        with_mask = self._mask_selection(batch, anomaly_maps, masks, has_mask)
        added.images_without_mask = int(batch - with_mask.sum())
        if with_mask.any():  # validates everything before it changes any state
            added.regions, added.anomalous_images_with_empty_mask = self._update_pixels(
                anomaly_maps, masks, with_mask, anomalous)
        self.image_hist.add(*image_part)
        self.counts = self.counts + added

    def _mask_selection(self, batch: int, anomaly_maps, masks, has_mask) -> np.ndarray:
        if not self.config.pixel or anomaly_maps is None or masks is None:
            if has_mask is not None and masks is None and bool(_to_numpy(has_mask, "has_mask").any()):
                raise ValueError("has_mask marks images as having masks but masks is None")
            return np.zeros(batch, dtype=bool)
        if has_mask is None:
            return np.ones(batch, dtype=bool)
        has_mask = _to_numpy(has_mask, "has_mask").reshape(-1).astype(bool)
        if has_mask.shape[0] != batch:
            raise ValueError(f"has_mask has {has_mask.shape[0]} entries for {batch} image scores")
        return has_mask

    def _update_pixels(self, anomaly_maps, masks, with_mask: np.ndarray,
                       anomalous: np.ndarray) -> tuple[int, int]:
        maps = _squeeze_channel(anomaly_maps, "anomaly_maps")
        binary = _squeeze_channel(_binary_masks(masks, "masks"), "masks")
        if tuple(maps.shape) != tuple(binary.shape) or maps.shape[0] != with_mask.shape[0]:
            raise ValueError(f"anomaly_maps {tuple(maps.shape)} and masks {tuple(binary.shape)} must both be "
                             f"[{with_mask.shape[0]}, H, W]")
        index = np.flatnonzero(with_mask)
        everything = len(index) == with_mask.shape[0]
        binary = binary if everything else binary[index]
        has_region = binary.reshape(len(index), -1).any(axis=1)
        wrong = index[has_region & ~anomalous[index]]
        if len(wrong):
            raise ValueError(f"images {wrong.tolist()} of the batch are labelled normal but their masks "
                             "have anomalous pixels")
        empty = int((~has_region & anomalous[index]).sum())
        region, region_sizes = anomalous_pixel_regions(binary)
        if _reduces_on_device(maps):
            device = maps.device
            if self._device_pixels is None:
                self._device_pixels = DeviceFold(self.config.pixel_capacity)
            shift = max(self._pixel_hist.shift, self._device_pixels.shift)
            keys = encode_torch(maps if everything else maps[torch.from_numpy(index).to(device)],
                                "anomaly_maps") >> shift
            self._device_pixels.add(*reduce_torch_bins(
                keys, torch.from_numpy(binary.reshape(-1)).to(device), shift,
                torch.from_numpy(region).to(device), torch.from_numpy(region_sizes)))
        else:
            shift = self.pixel_hist.shift
            maps = as_float_array(maps, "anomaly_maps")
            keys = shift_keys(encode_numpy(maps if everything else maps[index], "anomaly_maps"), shift)
            positive = binary.reshape(-1)
            part = (None, reduce_anomalous(keys[positive], shift, region, region_sizes))
            zero_bits = FLOAT32_ZERO_BITS if maps.dtype.kind == "f" and maps.dtype.itemsize <= 4 else 0
            normal_keys = keys[~positive]
            del keys
            self.pixel_hist.add_normal_keys(normal_keys, shift, zero_bits, fold=False)
            del normal_keys  # the batch's keys are freed before ``add`` folds (and maybe collapses)
            self.pixel_hist.add(*part)
        return len(region_sizes) - 1, empty

    # -- merging and state --------------------------------------------------------------------------
    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """A new accumulator holding both; identical whatever the order of merges."""
        if other.config != self.config:
            raise ValueError(f"cannot merge accumulators with configs {self.config} and {other.config}")
        out = MetricAccumulator(**asdict(self.config))
        out.counts = self.counts + other.counts
        out.image_hist = self.image_hist.merged(other.image_hist)
        out.pixel_hist = self.pixel_hist.merged(other.pixel_hist)
        return out

    def state_dict(self) -> dict:
        """Plain python/numpy state (picklable, no torch)."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "counts": asdict(self.counts),
            "image_histogram": self.image_hist.state_dict(),
            "pixel_histogram": self.pixel_hist.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> MetricAccumulator:
        if state.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported metric state version {state.get('version')!r}; "
                             f"expected one of {READABLE_VERSIONS}")
        config = dict(state["config"])
        if state["version"] == 1 and config["pixel_capacity"] == VERSION_1_PIXEL_CAPACITY:
            config["pixel_capacity"] = AccumulatorConfig.pixel_capacity  # that version's default: today's
        out = cls(**config)
        out.counts = SampleCounts(**state["counts"])
        out.image_hist = CollapsingHistogram.from_state_dict(state["image_histogram"])
        out.pixel_hist = CollapsingHistogram.from_state_dict(state["pixel_histogram"])
        out.pixel_hist.capacity = out.config.pixel_capacity  # capacities only grow: the bins stay valid
        return out

    # -- results ------------------------------------------------------------------------------------
    def compute(self) -> dict:
        """Metrics (float, or None with a reason under ``not_defined``), counts and resolution info."""
        result: dict = {}
        not_defined: dict[str, str] = {}
        image_bins = curves.curve_bins(self.image_hist)
        image = curves.CumulativeCounts.from_bins(image_bins)
        reason = _undefined_reason(image, "images", "image")
        values = (curves.auroc(image), curves.average_precision(image), curves.f1_max(image)) if not reason \
            else (None,) * 3
        result.update(zip(IMAGE_METRICS, values, strict=True))
        not_defined.update(dict.fromkeys(IMAGE_METRICS, reason) if reason else {})
        counts = asdict(self.counts)
        bounds = {} if reason else _error_bounds(image_bins, image, IMAGE_METRICS, None, 0.3)
        resolution = {"image_shift": image_bins.shift, "image_bins": image_bins.distinct,
                      "error_bounds": bounds}
        if self.config.pixel:
            pixel_bins = curves.curve_bins(self.pixel_hist)
            pixel = curves.CumulativeCounts.from_bins(pixel_bins)
            names = pixel_metric_names(self.config.aupro_limit)
            regions, limit = self.counts.regions, self.config.aupro_limit
            reason = _undefined_reason(pixel, "pixels", "pixel", self.counts.images_without_mask)
            if reason is None and regions == 0:
                reason = "no ground-truth regions"
            values = (curves.auroc(pixel), curves.average_precision(pixel), curves.f1_max(pixel),
                      curves.aupro(pixel, regions, limit)) if reason is None else (None,) * 4
            result.update(zip(names, values, strict=True))
            not_defined.update(dict.fromkeys(names, reason) if reason else {})
            counts.update(pixels=pixel.positives + pixel.negatives, anomalous_pixels=pixel.positives)
            resolution.update(pixel_shift=pixel_bins.shift, pixel_bins=pixel_bins.distinct)
            if reason is None:
                resolution["error_bounds"].update(_error_bounds(pixel_bins, pixel, names, regions, limit))
        result.update(not_defined=not_defined, counts=counts, resolution=resolution)
        return result


def _undefined_reason(c: curves.CumulativeCounts, unit: str, level: str, without_mask: int = 0) -> str | None:
    if c.positives + c.negatives == 0:
        extra = f" ({without_mask} images without a mask were excluded)" if without_mask else ""
        return f"no {unit} with {'a ground-truth mask' if level == 'pixel' else 'labels'}{extra}"
    if c.positives == 0:
        return f"no anomalous {unit}: the {level} metrics need both classes"
    if c.negatives == 0:
        return f"no normal {unit}: the {level} metrics need both classes"
    return None
