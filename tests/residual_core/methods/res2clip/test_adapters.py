"""Adapters start as the identity, keep shapes, and train."""

import pytest
import torch

from residual_core.methods.res2clip.adapters import MultiScaleConvAdapter, Res2ClipAdapters, ResidualAdapter


def test_adapters_are_identity_at_initialisation():
    torch.manual_seed(0)
    vectors = torch.randn(3, 16)
    torch.testing.assert_close(ResidualAdapter(16)(vectors), vectors)
    tokens = torch.randn(2, 12, 16)
    conv = MultiScaleConvAdapter(16)
    torch.testing.assert_close(conv(tokens, (3, 4)), tokens)
    assert conv.down.out_features == 4  # reduction 4


def test_conv_adapter_after_an_update_mixes_neighbours():
    torch.manual_seed(0)
    conv = MultiScaleConvAdapter(64)
    torch.nn.init.normal_(conv.up.weight)
    tokens = torch.randn(1, 36, 64)
    changed = tokens.clone()
    changed[0, 7] = torch.randn(64) * 3.0  # (row 1, col 1) on a 6x6 grid
    out, out_changed = conv(tokens, (6, 6)), conv(changed, (6, 6))
    assert out.shape == (1, 36, 64)
    neighbours = [0, 1, 2, 6, 8, 12, 13, 14]
    assert not torch.allclose(out[0, neighbours], out_changed[0, neighbours])  # neighbours see the change
    torch.testing.assert_close(out[0, 35], out_changed[0, 35])  # (5, 5): beyond the dilated reach
    with pytest.raises(ValueError, match="grid"):
        conv(tokens, (5, 6))


def test_adapter_set_follows_branches_and_authors_names():
    adapters = Res2ClipAdapters(("visual",), (1, 2), (2,), {1: 8, 2: 16}, None)
    assert set(adapters.groups()) == {"vis_adapters"}
    full = Res2ClipAdapters(("text", "visual", "residual"), (1, 2), (2,), {1: 8, 2: 8}, 8)
    keys = set(full.state_dict())
    assert "vis_adapters.1.up.weight" in keys and "res_vis_local_adapters.2.blend.weight" in keys
    assert {
        "text_adapter.fc1.weight",
        "res_text_adapter.fc2.weight",
        "res_vis_global_adapter.norm.bias",
    } <= keys
