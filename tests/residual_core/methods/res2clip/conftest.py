"""Backbones shared by the Res2CLIP tests (built once per session)."""

import pytest

from residual_core.backbones import create_backbone


@pytest.fixture(scope="session")
def clip_backbone(tiny_openclip_checkpoint):
    """The tiny random open_clip ViT loaded through the checkpoint path (64 px, 4x4 grid, layers 1-4)."""
    return create_backbone(tiny_openclip_checkpoint.spec)


@pytest.fixture(scope="session")
def cnn_backbone():
    """The offline EfficientNet-Lite0 (real ImageNet weights, no text tower) at 64 px."""
    return create_backbone("effnet-lite0", image_size=64)
