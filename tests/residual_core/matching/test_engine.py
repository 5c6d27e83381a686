import pytest
import torch

from residual_core import faiss_index
from residual_core.matching import (
    grid_positions,
    match,
    match_per_sample,
    parse_strategy,
    prepare_reference,
)
from tests.residual_core.matching.oracle import oracle_match

SIDE, K_SHOT, DIM = 6, 2, 16
GRID = (SIDE, SIDE)
STRATEGIES = [
    "sparse_radial_knn",
    "1nn",
    "2nn",
    "radial_3nn",
    "local_1nn",
    "polar_knn",
    "sparse_local_knn",
    "radial_margin_2nn",
    "radial_laplace_1nn",
    "polar_linear_2nn",
    "radial_euc_knn",
    "euc_new_2nn",
    "radial_new_1nn",
]


def normalised(x):
    return x / x.norm(dim=-1, keepdim=True)


def make_data(seed=0, batch=3, noise=0.3):
    """References: k_shot noisy copies of a base image; queries: more noisy copies (peaked similarities)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SIDE * SIDE, DIM, generator=g)
    references = torch.cat([base + noise * torch.randn(base.shape, generator=g) for _ in range(K_SHOT)])
    queries = torch.stack([base + noise * torch.randn(base.shape, generator=g) for _ in range(batch)])
    positions = grid_positions(GRID).repeat(K_SHOT, 1)
    return normalised(queries), references, positions


@pytest.mark.parametrize("text", STRATEGIES)
@pytest.mark.parametrize("pooling", [False, True])
def test_torch_path_reproduces_the_formulas(text, pooling):
    queries, references, positions = make_data()
    strategy = parse_strategy(text, spatial_penalty=0.05, pooling=pooling)
    result = match(queries, prepare_reference(references, positions, GRID, pooling=pooling), strategy)
    expected = oracle_match(queries, normalised(references), K_SHOT, strategy, pooling=pooling)
    assert torch.allclose(result.matched.double(), expected, atol=1e-5)
    assert torch.allclose(result.anomaly_map.double(), 1 - (queries.double() * expected).sum(-1), atol=1e-5)
    assert result.matched.shape == queries.shape and result.anomaly_map.shape == queries.shape[:2]


@pytest.mark.parametrize("text", ["sparse_radial_knn", "sparse_local_knn", "sparse_knn"])
@pytest.mark.parametrize("noise", [0.05, 0.3, 3.0])  # peaked to flat similarities: small to large supports
def test_sparsemax_over_a_bank_large_enough_to_prune(text, noise):
    """Banks of hundreds of references take the pruned threshold (no row sorts): still the formulas."""
    side, shots = 14, 3
    g = torch.Generator().manual_seed(7)
    base = torch.randn(side * side, DIM, generator=g)
    references = torch.cat([base + noise * torch.randn(base.shape, generator=g) for _ in range(shots)])
    queries = normalised(torch.stack([base + noise * torch.randn(base.shape, generator=g) for _ in range(2)]))
    positions = grid_positions((side, side)).repeat(shots, 1)
    strategy = parse_strategy(text, spatial_penalty=0.01)
    result = match(queries, prepare_reference(references, positions, (side, side)), strategy)
    expected = oracle_match(queries, normalised(references), shots, strategy)
    assert torch.allclose(result.matched.double(), expected, atol=1e-5)


@pytest.mark.parametrize("text", STRATEGIES)
@pytest.mark.parametrize(("pooling", "noise"), [(False, 0.3), (True, 0.3), (False, 3.0)])
def test_exact_faiss_path_equals_brute_force(text, pooling, noise):
    queries, references, positions = make_data(seed=1, noise=noise)
    strategy = parse_strategy(text, pooling=pooling)
    reference = prepare_reference(references, positions, GRID, pooling=pooling)
    brute = match(queries, reference, strategy, path="torch")
    index = faiss_index.build_index(reference.search_vectors(), normalise=False)
    fast = match(queries, reference, strategy, path="faiss", index=index, candidates=4)
    assert torch.allclose(fast.matched, brute.matched, atol=1e-5)
    assert torch.allclose(fast.anomaly_map, brute.anomaly_map, atol=1e-5)
    if strategy.weighting == "nearest":
        assert torch.equal(fast.nearest, brute.nearest)


def test_faiss_path_certifies_most_rows_on_peaked_data_and_falls_back_otherwise():
    queries, references, positions = make_data(seed=2, noise=0.1)
    reference = prepare_reference(references, positions, GRID)
    peaked = match(queries, reference, parse_strategy("radial_1nn"), path="faiss", candidates=4)
    assert peaked.fallback_rows < queries.shape[0] * queries.shape[1] // 4
    # identical references: sparsemax spreads over all of them, candidates cannot certify, brute force runs
    same = prepare_reference(references[:1].expand(SIDE * SIDE, -1), grid_positions(GRID), GRID)
    strategy = parse_strategy("sparse_2nn")
    spread = match(queries, same, strategy, path="faiss", candidates=2)
    assert spread.fallback_rows == queries.shape[0] * queries.shape[1]
    assert torch.allclose(spread.matched, match(queries, same, strategy).matched, atol=1e-5)


@pytest.mark.parametrize("path", ["torch", "faiss"])
def test_batch_size_and_block_size_do_not_change_results(path):
    queries, references, positions = make_data(seed=4, batch=4)
    reference = prepare_reference(references, positions, GRID)
    strategy = parse_strategy()
    together = match(queries, reference, strategy, path=path)
    one_by_one = [match(queries[i : i + 1], reference, strategy, path=path) for i in range(4)]
    tiny_blocks = match(queries, reference, strategy, path=path, max_elements=100)
    assert torch.allclose(together.matched, torch.cat([r.matched for r in one_by_one]), atol=1e-6)
    assert torch.allclose(together.matched, tiny_blocks.matched, atol=1e-6)


@pytest.mark.parametrize("text", ["1nn", "radial_1nn", "local_1nn", "2nn", "radial_3nn", "polar_knn"])
@pytest.mark.parametrize("pooling", [False, True])
@pytest.mark.parametrize("max_elements", [7, 100, 1000, 1 << 24])
def test_blocked_search_equals_the_dense_ranking(text, pooling, max_elements):
    """1-NN / top-K run the blocked exact search: same columns as the dense argmax / topk of the oracle's
    penalised search matrix, whatever the block size (7 and 100 do not divide the 72 references)."""
    queries, references, positions = make_data(seed=7)
    strategy = parse_strategy(text, spatial_penalty=0.05, pooling=pooling)
    reference = prepare_reference(references, positions, GRID, pooling=pooling)
    result = match(queries, reference, strategy, max_elements=max_elements)
    expected = oracle_match(queries, normalised(references), K_SHOT, strategy, pooling=pooling)
    assert torch.allclose(result.matched.double(), expected, atol=1e-5)
    if strategy.weighting == "nearest":
        expected_columns = (expected @ normalised(references).double().T).argmax(-1)  # matched = r[argmax]
        assert torch.equal(result.nearest, expected_columns)


def test_identical_reference_gives_zero_anomaly():
    queries, _, _ = make_data(seed=5, batch=1)
    reference = prepare_reference(queries[0], grid_positions(GRID), GRID)
    for text in ("1nn", "radial_1nn", "local_1nn"):
        result = match(queries, reference, parse_strategy(text))
        assert torch.allclose(result.anomaly_map, torch.zeros(1, SIDE * SIDE), atol=1e-6)
        assert torch.equal(result.nearest[0], torch.arange(SIDE * SIDE))


def test_penalty_prefers_the_reference_on_the_same_ring():
    """Two identical references, one at the query's radius and one at the centre: radial picks the first."""
    feature = torch.randn(1, 1, DIM)
    query = torch.cat([torch.randn(SIDE * SIDE - 1, DIM), feature[0]])[None]  # last cell: corner (5, 5)
    reference_features = torch.cat([feature[0], feature[0]])
    reference_positions = torch.tensor([[2, 2], [0, 0]])  # centre-ish vs the opposite corner (same radius)
    reference = prepare_reference(reference_features, reference_positions, GRID)
    nearest = match(normalised(query), reference, parse_strategy("radial_1nn")).nearest
    assert nearest[0, -1] == 1
    nearest_local = match(normalised(query), reference, parse_strategy("local_1nn")).nearest
    assert nearest_local[0, -1] == 0  # (2,2) is closer to (5,5) than (0,0)


def test_per_sample_references_equal_separate_matches():
    queries, references, _ = make_data(seed=6, batch=2)
    per_sample = references[: SIDE * SIDE].expand(2, -1, -1) + 0.1 * torch.randn(2, SIDE * SIDE, DIM)
    strategy = parse_strategy()
    together = match_per_sample(queries, per_sample, strategy, grid=GRID)
    for b in range(2):
        alone = match(
            queries[b : b + 1], prepare_reference(per_sample[b], grid_positions(GRID), GRID), strategy
        )
        assert torch.allclose(together.matched[b], alone.matched[0], atol=1e-6)


def test_clear_errors():
    queries, references, positions = make_data()
    with pytest.raises(ValueError, match="needs reference positions"):
        match(queries, prepare_reference(references), parse_strategy("radial_1nn"))
    with pytest.raises(ValueError, match="query grid"):
        match(
            queries[:, :20],
            prepare_reference(references, positions, GRID),
            parse_strategy("radial_1nn"),
            query_grid=(4, 5),
        )
    with pytest.raises(ValueError, match="does not hold the query's 36 patches"):
        match(queries, prepare_reference(references), parse_strategy("1nn"), query_grid=(4, 5))
    with pytest.raises(ValueError, match="whole reference grids"):
        prepare_reference(references[:-1], positions[:-1], GRID, pooling=True)
    with pytest.raises(ValueError, match="prepare_reference\\(pooling=True\\)"):
        match(queries, prepare_reference(references, positions, GRID), parse_strategy("1nn", pooling=True))
    with pytest.raises(ValueError, match="matching path"):
        match(queries, prepare_reference(references, positions, GRID), parse_strategy("1nn"), path="gpu")
