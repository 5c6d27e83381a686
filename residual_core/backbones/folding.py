"""Fold a frozen CNN's batch norms into the convolutions that feed them (inference only).

Backbones never train and stay in eval mode, where a batch norm is a fixed per-channel affine map:
conv(x) * s + t is one convolution with weights w * s and bias b * s + t. timm's EfficientNet-Lite0 spent
about a third of its CPU forward in its 33 batch norms; folded, the forward ran 1.5x faster (RESULTS.md,
twelfth pass). The features change by float rounding only (about 1e-6 of their largest value).

Which batch norm belongs to which convolution is found by running the model once on a small probe: a
norm is folded only when its input is the very tensor a convolution returned. The folded model must then
give the probe's features to `TOLERANCE`; a model where it does not (a convolution's output also used
elsewhere) is returned unfolded.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

PROBE_SIZE = 64  # probe images [1, 3, 64, 64]: every timm CNN's total stride divides it
TOLERANCE = 1e-4  # largest feature difference allowed, relative to the largest feature value
_FOLDABLE_NORMS = (nn.BatchNorm2d, BatchNormAct2d)  # exactly these types: other subclasses may do more


def fold_batch_norms(features: nn.Module) -> nn.Module:
    """`features` (eval mode) with each batch norm that directly follows a convolution folded into it:
    the convolution gains the norm's affine map and the norm becomes its activation (timm's
    `BatchNormAct2d`) or nothing. Returns `features` itself when there is nothing to fold or the folded
    copy does not reproduce its outputs."""
    features.eval()
    probe = torch.randn(1, 3, PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(features.parameters()).device)
    pairs, expected = _conv_norm_pairs(features, probe)
    if not pairs:
        return features
    folded = copy.deepcopy(features)
    modules = dict(folded.named_modules())
    for conv_name, norm_name in pairs:
        norm = modules[norm_name]
        _replace(folded, conv_name, fuse_conv_bn_eval(modules[conv_name], norm))
        after = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
        _replace(folded, norm_name, after)
    with torch.no_grad():
        outputs = _as_list(folded(probe))
    scale = max(float(e.abs().max()) for e in expected) or 1.0
    same = len(outputs) == len(expected) and all(
        o.shape == e.shape and float((o - e).abs().max()) <= TOLERANCE * scale
        for o, e in zip(outputs, expected, strict=True)
    )
    return folded if same else features


def _conv_norm_pairs(features: nn.Module, probe: Tensor) -> tuple[list[tuple[str, str]], list[Tensor]]:
    """(convolution name, norm name) for each foldable norm whose input is a convolution's output, found
    by one forward of `probe`; and that forward's outputs."""
    names = {module: name for name, module in features.named_modules()}
    made_by: dict[int, tuple[Tensor, str]] = {}  # id(output) -> (output kept alive, conv name)
    pairs: list[tuple[str, str]] = []

    def after_conv(module, inputs, output):
        made_by[id(output)] = (output, names[module])

    def before_norm(module, inputs):
        source = made_by.get(id(inputs[0]))
        if source is not None and source[0] is inputs[0]:
            pairs.append((source[1], names[module]))

    hooks = []
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif type(module) in _FOLDABLE_NORMS and module.track_running_stats:
            hooks.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.no_grad():
            outputs = _as_list(features(probe))
    finally:
        for hook in hooks:
            hook.remove()
    used = [name for pair in pairs for name in pair]
    if len(used) != len(set(used)):  # a module run twice: sharing weights between places, leave it
        return [], outputs
    return pairs, outputs


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attribute, module)


def _as_list(outputs) -> list[Tensor]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
