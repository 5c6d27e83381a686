"""The class-agnostic prompt bank and the text residual arithmetic."""

import pytest
import torch

from residual_core.methods.res2clip.prompts import TEMPLATES, compute_text_residuals, prompt_sets


def test_prompt_bank_is_the_authors():
    sets = prompt_sets()
    assert len(TEMPLATES) == 15
    assert len(sets.neutral) == 15 and len(sets.normal) == 75 and len(sets.anomalous) == 30
    assert sets.neutral[0] == "a photo of a object."
    assert sets.normal[0] == "a photo of a  object."  # empty state, as their f"{state} {noun}"
    assert "itap of a undamaged object." in sets.normal
    assert sets.anomalous[:2] == ("a photo of a damaged object.", "a photo of the damaged object.")
    assert sets.anomalous[15] == "a photo of a object with damaged."


def test_text_residual_is_normalised_difference_of_mean_directions():
    def encode(texts):  # three fixed directions by prompt set, with per-prompt scale noise
        out = []
        for text in texts:
            if "damaged" in text and "undamaged" not in text:
                base = torch.tensor([0.0, 1.0, 0.0])
            elif any(word in text for word in ("perfect", "flawless", "clean", "undamaged", "  ")):
                base = torch.tensor([1.0, 0.0, 0.0])
            else:
                base = torch.tensor([0.0, 0.0, 1.0])
            out.append(base * (1 + len(text)))
        return torch.stack(out)

    text = compute_text_residuals(encode)
    torch.testing.assert_close(text.anomalous, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(text.normal, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(text.anomaly, torch.tensor([-1.0, 1.0, 0.0]) / 2**0.5)
    torch.testing.assert_close(text.normal_residual, torch.tensor([1.0, 0.0, -1.0]) / 2**0.5)
    assert text.anomaly.norm().item() == pytest.approx(1.0)
