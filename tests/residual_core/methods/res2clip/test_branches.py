"""Branch formulas on small hand-computed vectors."""

import pytest
import torch

from residual_core.methods.res2clip import branches as br


def test_text_visual_and_alignment_maps():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2, 2]
    r_t = torch.tensor([0.6, 0.8])
    torch.testing.assert_close(br.text_map(tokens, r_t), torch.tensor([[0.6, 0.8]]))
    residual = torch.tensor([[[3.0, 4.0], [-1.0, 0.0]]])
    torch.testing.assert_close(br.visual_map(residual), torch.tensor([[5.0, 1.0]]))
    # 3*0.6 + 4*0.8 = 5 ; -0.6 clamped to 0
    torch.testing.assert_close(br.alignment_map(residual, r_t), torch.tensor([[5.0, 0.0]]))
    # per-sample directions [B, D]
    torch.testing.assert_close(br.text_map(tokens, r_t[None]), torch.tensor([[0.6, 0.8]]))


def test_global_residual_uses_normalised_mean_of_references():
    query = torch.tensor([[1.0, 0.0]])
    refs = br.unit(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))  # mean (0.707, 0) -> (1, 0)
    torch.testing.assert_close(br.global_residual(query, refs), torch.zeros(1, 2))
    refs2 = torch.tensor([[0.0, 1.0]])
    residual = br.global_residual(query, refs2)
    torch.testing.assert_close(residual, torch.tensor([[1.0, -1.0]]))
    assert br.global_alignment_score(residual, torch.tensor([0.0, 1.0])).item() == 0.0  # clamp(-1, 0)
    assert br.global_alignment_score(residual, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0)
    assert br.global_text_score(query, torch.tensor([0.6, 0.8])).item() == pytest.approx(0.6)
