"""Typed hyper-parameters of PatchCore with the defaults of the authors' released code.

Reference: amazon-science/patchcore-inspection (`src/patchcore/patchcore.py`, `common.py`, `sampler.py`,
`bin/run_patchcore.py`, `sample_training.sh`: the "IM224 WR50 L2-3 P01 D1024-1024 PS-3 AN-1" baseline) and
the paper (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).
`docs/methods/patchcore.md` says where each default comes from and where the code and paper differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from residual_core.methods.base import MethodError
from residual_core.preprocess import PREPROCESS_NAMES

# "l2": the paper's ||m_test - m||_2 (eqs. 6, 7); "squared_l2": what the released code scores with
# (FAISS IndexFlatL2 returns squared distances). Same image ranking with image_score="max" (a monotone
# transform of the max); the smoothed maps differ slightly. Default "l2": see docs/methods/patchcore.md.
PATCH_DISTANCES = ("l2", "squared_l2")
# "max": the released code (max patch score); "reweighted": the paper's eq. 7 (s = w * s*)
IMAGE_SCORES = ("max", "reweighted")


@dataclass(frozen=True)
class PatchCoreConfig:
    """Every knob of the method. Layers are the backbone's layer numbers (its `identity.layers`); the
    first one listed sets the patch grid, as in the reference code (`ref_num_patches = patch_shapes[0]`)."""

    # timm feature levels 2 and 3: WideResNet50 layer2 + layer3 (strides 8, 16) in the reference; for
    # effnet-lite0 the levels of the same strides (40 and 112 channels)
    layers: tuple[int, ...] = (2, 3)
    patchsize: int = 3  # PatchMaker(patchsize=3, stride=1), padding (patchsize - 1) / 2
    pretrain_embed_dimension: int = 1024  # Preprocessing / MeanMapper: per-layer adaptive avg pool
    target_embed_dimension: int = 1024  # Aggregator: adaptive avg pool over the layers' concatenation
    anomaly_score_num_nn: int = 1  # NearestNeighbourScorer: mean over the k nearest distances
    patch_distance: str = "l2"
    image_score: str = "max"
    reweight_neighbours: int = 9  # b in eq. 7 (only for image_score="reweighted"; see the docs)
    coreset_fraction: float | None = None  # None: keep every patch (few-shot); reference runs use 0.1
    coreset_projection_dim: int | None = 128  # ApproximateGreedyCoresetSampler's random projection
    coreset_seed: int = 0  # run_patchcore.py --seed 0
    smoothing_sigma: float = 4.0  # RescaleSegmentor: scipy gaussian_filter(sigma=4)
    preprocess: str = "patchcore"  # Resize(256) bilinear + CenterCrop(224) (datasets/mvtec.py)

    def __post_init__(self) -> None:
        layers = self.layers
        if (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers)):
            raise MethodError(f"patchcore: layers must be a sequence of ints, got {layers!r}")
        object.__setattr__(self, "layers", tuple(int(v) for v in layers))
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise MethodError(f"patchcore: layers must be non-empty and distinct, got {self.layers}")
        _check_int("patchsize", self.patchsize)
        if self.patchsize % 2 == 0:
            raise MethodError(f"patchcore: patchsize must be odd (same-size padding), got {self.patchsize}")
        for name in ("pretrain_embed_dimension", "target_embed_dimension", "anomaly_score_num_nn",
                     "reweight_neighbours"):
            _check_int(name, getattr(self, name))
        _check_choice("patch_distance", self.patch_distance, PATCH_DISTANCES)
        _check_choice("image_score", self.image_score, IMAGE_SCORES)
        _check_choice("preprocess", self.preprocess, PREPROCESS_NAMES)
        fraction = self.coreset_fraction
        if fraction is not None:
            number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
            if not number or not 0.0 < fraction <= 1.0:
                raise MethodError(f"patchcore: coreset_fraction must be None or in (0, 1], got {fraction!r}")
            object.__setattr__(self, "coreset_fraction", float(fraction))
        if self.coreset_projection_dim is not None:
            _check_int("coreset_projection_dim", self.coreset_projection_dim)
        if isinstance(self.coreset_seed, bool) or not isinstance(self.coreset_seed, int):
            raise MethodError(f"patchcore: coreset_seed must be an int, got {self.coreset_seed!r}")
        sigma = self.smoothing_sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma < 0:
            raise MethodError(f"patchcore: smoothing_sigma must be >= 0 (0: no smoothing), got {sigma!r}")
        object.__setattr__(self, "smoothing_sigma", float(sigma))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PatchCoreConfig:
        """Keyword hyper-parameters (a run config's `method.params`, or `to_dict()`) -> config; unknown
        keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MethodError(f"patchcore: unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MethodError(f"patchcore: {name} must be an int >= 1, got {value!r}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise MethodError(f"patchcore: {name} must be one of {choices}, got {value!r}")
