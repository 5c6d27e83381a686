"""Typed configuration of the offline benchmark: sizes per scale and the build options."""

from __future__ import annotations

from dataclasses import dataclass

#: defect area bounds (fraction of the image area covered by the mask)
MIN_DEFECT_AREA = 0.002
MAX_DEFECT_AREA = 0.08
#: pixels between any reference (train) region and any test region of one source photo
SPLIT_GAP_PX = 16


@dataclass(frozen=True)
class BenchScale:
    """How many samples each category gets and at which resolution they are written.

    ``output_px`` None keeps the crop's native resolution (no resampling beyond the identity)."""

    name: str
    output_px: int | None
    train_per_category: int
    test_normal_per_category: int
    test_defective_per_category: int
    elpv_train_per_category: int | None  # None: every normal cell that is not in the test split
    elpv_test_defective_per_category: int | None  # None: every probability-1 cell
    elpv_output_px: int | None  # None: the native 300 px cells


SCALES: dict[str, BenchScale] = {
    "small": BenchScale("small", output_px=128, train_per_category=8, test_normal_per_category=10,
                        test_defective_per_category=10, elpv_train_per_category=8,
                        elpv_test_defective_per_category=10, elpv_output_px=128),
    "full": BenchScale("full", output_px=None, train_per_category=24, test_normal_per_category=32,
                       test_defective_per_category=32, elpv_train_per_category=None,
                       elpv_test_defective_per_category=None, elpv_output_px=None),
}


@dataclass(frozen=True)
class BenchConfig:
    """Options of one `build-bench` run."""

    seed: int = 0
    scale: str = "small"
    elpv_uncertain: bool = False  # also put the 1/3 and 2/3 ELPV cells into the test split (label 1)
    datasets: tuple[str, ...] | None = None  # None: all datasets

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}: must be one of {', '.join(SCALES)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be a non-negative integer")

    @property
    def sizes(self) -> BenchScale:
        return SCALES[self.scale]
