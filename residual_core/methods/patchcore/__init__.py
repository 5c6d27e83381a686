"""PatchCore: locally aware patch features, a memory bank of the references' patches, nearest-neighbour
scores (Roth et al., CVPR 2022; amazon-science/patchcore-inspection). See docs/methods/patchcore.md."""

from residual_core.methods.patchcore.config import IMAGE_SCORES, PATCH_DISTANCES, PatchCoreConfig
from residual_core.methods.patchcore.method import PatchCore, build_patchcore, patchcore_preprocess

__all__ = [
    "IMAGE_SCORES",
    "PATCH_DISTANCES",
    "PatchCore",
    "PatchCoreConfig",
    "build_patchcore",
    "patchcore_preprocess",
]
