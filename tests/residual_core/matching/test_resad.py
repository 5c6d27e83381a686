import pytest
import torch

from residual_core import faiss_index
from residual_core.matching.resad import matched_reference_maps, nearest_reference_indices, residual


def test_matched_maps_return_raw_cosine_nearest_references():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(40, 8, generator=g) * torch.rand(40, 1, generator=g) * 10  # varied norms
    chosen = torch.randint(40, (2, 3, 4), generator=g)
    scales = torch.rand(2, 3, 4, 1, generator=g) + 0.5
    feature_map = (reference[chosen] * scales).permute(0, 3, 1, 2)  # scaled copies: same direction
    matched = matched_reference_maps(feature_map, reference)
    assert matched.shape == feature_map.shape
    assert torch.equal(matched, reference[chosen].permute(0, 3, 1, 2))  # raw, unnormalised reference


def test_nearest_indices_equal_brute_force_argmax_on_both_paths():
    g = torch.Generator().manual_seed(1)
    features, reference = torch.randn(3, 20, 16, generator=g), torch.randn(100, 16, generator=g)
    expected = (faiss_index.normalise_rows(features) @ faiss_index.normalise_rows(reference).T).argmax(-1)
    assert torch.equal(nearest_reference_indices(features, reference), expected)
    index = faiss_index.build_index(reference)
    assert torch.equal(nearest_reference_indices(features, reference, path="faiss", index=index), expected)


def test_nearest_indices_keep_argmax_ties_and_equal_the_dense_path_at_stride_4_size():
    """ResAD's matching stays the argmax of normalised inner products, first index on exact ties."""
    g = torch.Generator().manual_seed(2)
    reference = torch.randn(3136, 24, generator=g)  # one 56x56 shot, 24 channels
    reference = torch.cat([reference, reference[:1000]])  # duplicates: exactly tied cosines
    features = torch.randn(2, 3136, 24, generator=g)
    features[0, :500] = reference[:500] * 0.5  # queries on tied references (x 0.5 is exact)
    query, normalised = faiss_index.normalise_rows(features), faiss_index.normalise_rows(reference)
    expected = torch.stack([(q @ normalised.T).argmax(-1) for q in query])
    nearest = nearest_reference_indices(features, reference)
    assert torch.equal(nearest, expected)
    assert torch.equal(nearest[0, :500], torch.arange(500))  # the first of two equal directions
    assert torch.equal(nearest_reference_indices(features, reference, max_elements=100_000), expected)


def test_residuals_plain_and_squared():
    f, p = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]])
    assert torch.equal(residual(f, p), torch.tensor([[0.5, -3.0]]))
    assert torch.equal(residual(f, p, squared=True), torch.tensor([[0.25, 9.0]]))
    with pytest.raises(ValueError, match="equal shapes"):
        residual(f, p[:, :1])
