"""Typed configuration of Res2CLIP, with the authors' defaults for both modes.

Every default comes from the authors' `test.py` / `train.py` argparse defaults and the
`test_*.sh` / `train.sh` scripts; `docs/methods/res2clip.md` cites each one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

from residual_core.methods.base import MethodError
from residual_core.preprocess import PREPROCESS_NAMES

Mode = Literal["training-free", "finetune"]
BRANCHES: tuple[str, ...] = ("text", "visual", "residual")
MODES: tuple[str, ...] = ("training-free", "finetune")


@dataclass(frozen=True)
class BranchWeights:
    """Weights of the three branches in one fusion (pixel map or image score)."""

    text: float
    visual: float
    residual: float

    def get(self, branch: str) -> float:
        return float(getattr(self, branch))


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (train.py argparse defaults)."""

    epochs: int = 10
    batch_size: int = 16
    lr_visual: float = 5e-4  # --lr_v: visual and residual-visual adapters
    lr_text: float = 1e-4  # --lr_t: text and residual-text adapters
    betas: tuple[float, float] = (0.5, 0.999)
    tau: float = 1.0  # --tau: margin scale of every ranking loss
    grad_clip: float = 1.0
    warmup_epochs: float = 1.0  # train.py: warm-up = one epoch of steps
    seed: int = 111


@dataclass(frozen=True)
class Res2ClipConfig:
    """All Res2CLIP hyper-parameters.

    Layers are backbone layer numbers (e.g. 6/12/18/24 for ViT-L/14). `None` resolves against the
    backbone's chosen layers the way the authors' defaults relate to their layers 6/12/18/24:
    visual = all layers, text = the last layer, residual = the last layer (training-free) or all
    layers (finetune).
    """

    mode: Mode = "training-free"
    branches: tuple[str, ...] | None = None  # None: every branch the backbone can provide
    text_layers: tuple[int, ...] | None = None
    visual_layers: tuple[int, ...] | None = None
    residual_layers: tuple[int, ...] | None = None
    # matching (test.py / train.py): --match_strategy, --spatial_penalty; knn.py keyword defaults
    match_strategy: str = "sparse_radial_knn"
    spatial_penalty: float = 0.01
    k_neighbors: int = 5
    temperature: float = 0.05
    pooling: bool = False
    match_path: str = "torch"  # "torch" exact brute force, or "faiss" candidates + exact re-rank
    # smoothing (test.py: get_gaussian_kernel(kernel_size=5, sigma=4))
    gaussian_kernel_size: int = 5
    gaussian_sigma: float = 4.0
    top_fraction: float = 0.01  # test.py top1pct
    global_share: float = 0.5  # s_text = 0.5 top1pct(M_text) + 0.5 s_text_cls (same for residual)
    pixel_weights: BranchWeights = field(default_factory=lambda: BranchWeights(0.1, 1.0, 1.0))
    image_weights: BranchWeights = field(default_factory=lambda: BranchWeights(1.0, 1.0, 1.0))
    adapter_reduction: int = 4  # adapter.py: reduction=4
    # image/mask preprocessing preset (residual_core.preprocess): the authors' PIL Resize((S, S)) bicubic,
    # masks bilinear > 0.5 (utils/utils.py get_transform, test.py)
    preprocess: str = "res2clip"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MethodError(f"res2clip: unknown mode {self.mode!r}; expected one of {MODES}")
        if self.branches is not None:
            unknown = [b for b in self.branches if b not in BRANCHES]
            if unknown or not self.branches:
                raise MethodError(f"res2clip: branches {self.branches!r} invalid; choose from {BRANCHES}")
        if self.match_path not in ("torch", "faiss"):
            raise MethodError(f"res2clip: match_path must be 'torch' or 'faiss', got {self.match_path!r}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise MethodError(f"res2clip: top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.gaussian_kernel_size < 1 or self.gaussian_kernel_size % 2 == 0:
            raise MethodError(f"res2clip: gaussian_kernel_size must be odd, got {self.gaussian_kernel_size}")
        if self.preprocess not in PREPROCESS_NAMES:
            raise MethodError(f"res2clip: preprocess must be one of {PREPROCESS_NAMES}, "
                              f"got {self.preprocess!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Res2ClipConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MethodError(f"res2clip: unknown config keys {unknown}")
        kwargs = dict(data)
        for key in ("branches", "text_layers", "visual_layers", "residual_layers"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        for key in ("pixel_weights", "image_weights"):
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = BranchWeights(**kwargs[key])
        if isinstance(kwargs.get("train"), dict):
            train = dict(kwargs["train"])
            if "betas" in train:
                train["betas"] = tuple(train["betas"])
            kwargs["train"] = TrainConfig(**train)
        return cls(**kwargs)


def default_config(mode: Mode = "training-free", **overrides) -> Res2ClipConfig:
    """The authors' configuration for `mode`, with keyword overrides.

    Fusion weights (test.py): training-free M = 0.1 M_text + M_vis + M_res and
    s = s_text + s_vis + s_res; finetune M = 0.1 M_text + M_vis + 0.1 M_res and
    s = s_text + s_vis + 0.1 s_res. `train` may be a dict of TrainConfig overrides.
    """
    if mode not in MODES:
        raise MethodError(f"res2clip: unknown mode {mode!r}; expected one of {MODES}")
    residual_weight = 1.0 if mode == "training-free" else 0.1
    base = Res2ClipConfig(
        mode=mode,
        pixel_weights=BranchWeights(0.1, 1.0, residual_weight),
        image_weights=BranchWeights(1.0, 1.0, residual_weight),
    )
    overrides = dict(overrides)
    if isinstance(overrides.get("train"), dict):
        overrides["train"] = replace(base.train, **_tuple_betas(overrides["train"]))
    for key in ("pixel_weights", "image_weights"):
        if isinstance(overrides.get(key), dict):
            overrides[key] = replace(getattr(base, key), **overrides[key])
    for key in ("branches", "text_layers", "visual_layers", "residual_layers"):
        if overrides.get(key) is not None:
            overrides[key] = tuple(overrides[key])
    unknown = sorted(set(overrides) - {f.name for f in fields(Res2ClipConfig)})
    if unknown:
        raise MethodError(f"res2clip: unknown config keys {unknown}")
    return replace(base, **overrides)


def _tuple_betas(train: dict) -> dict:
    train = dict(train)
    if "betas" in train:
        train["betas"] = tuple(train["betas"])
    return train


@dataclass(frozen=True)
class LayerPlan:
    """Branches and layers resolved against one backbone."""

    branches: tuple[str, ...]
    text_layers: tuple[int, ...]
    visual_layers: tuple[int, ...]
    residual_layers: tuple[int, ...]

    @property
    def used_layers(self) -> tuple[int, ...]:
        """Sorted union of the layers of the branches that run (their ALL_LAYERS)."""
        layers = set()
        if "text" in self.branches:
            layers.update(self.text_layers)
        if "visual" in self.branches:
            layers.update(self.visual_layers)
        if "residual" in self.branches:
            layers.update(self.residual_layers)
        return tuple(sorted(layers))

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_plan(config: Res2ClipConfig, backbone_layers: tuple[int, ...], has_text: bool) -> LayerPlan:
    """Choose branches and layers for a backbone; a branch it cannot provide is a MethodError."""
    backbone_layers = tuple(backbone_layers)
    if not backbone_layers:
        raise MethodError("res2clip: the backbone exposes no layers")
    text_capable = ("text", "residual")
    if config.branches is None:
        branches = BRANCHES if has_text else ("visual",)
    else:
        branches = tuple(b for b in BRANCHES if b in config.branches)
        missing = [b for b in branches if b in text_capable and not has_text]
        if missing:
            raise MethodError(
                f"res2clip: branch(es) {missing} need a text encoder, but the backbone has none "
                f"(has_text=False); use branches=('visual',) or a CLIP backbone"
            )
    last, every = (backbone_layers[-1],), backbone_layers
    default_residual = last if config.mode == "training-free" else every
    plan = LayerPlan(
        branches=branches,
        text_layers=config.text_layers if config.text_layers is not None else last,
        visual_layers=config.visual_layers if config.visual_layers is not None else every,
        residual_layers=config.residual_layers if config.residual_layers is not None else default_residual,
    )
    for name in ("text", "visual", "residual"):
        if name not in branches:
            continue
        layers = getattr(plan, f"{name}_layers")
        if not layers:
            raise MethodError(f"res2clip: the {name} branch runs but has no layers")
        absent = [layer for layer in layers if layer not in backbone_layers]
        if absent:
            raise MethodError(
                f"res2clip: {name}_layers {list(layers)} include {absent}, which the backbone does not "
                f"expose (its layers: {list(backbone_layers)})"
            )
    return plan
