import pytest

from residual_core.matching import MatchStrategy, parse_strategy


@pytest.mark.parametrize(
    ("text", "weighting", "penalty", "k"),
    [
        ("sparse_radial_knn", "sparsemax", "radial", 5),
        ("2nn", "softmax", "", 2),
        ("1nn", "nearest", "", 1),
        ("knn", "softmax", "", 5),
        ("radial_3nn", "softmax", "radial", 3),
        ("local_1nn", "nearest", "local", 1),
        ("polar_linear_2nn", "softmax", "polar_linear", 2),
        ("radial_euc_Knn", "softmax", "radial_euc", 5),
        ("euc_new_4nn", "softmax", "euc_new", 4),
        ("sparse_2nn", "sparsemax", "", 2),
    ],
)
def test_parse_strategy_follows_the_authors_format(text, weighting, penalty, k):
    parsed = parse_strategy(text)
    assert (parsed.weighting, parsed.penalty, parsed.k_neighbors) == (weighting, penalty, k)


def test_defaults_are_the_authors():
    default = parse_strategy()
    assert default == MatchStrategy(
        weighting="sparsemax",
        penalty="radial",
        k_neighbors=5,
        spatial_penalty=0.01,
        temperature=0.05,
        pooling=False,
    )


def test_knn_suffix_uses_k_neighbors_and_use_sparse_forces_sparsemax():
    assert parse_strategy("radial_knn", k_neighbors=1).weighting == "nearest"
    assert parse_strategy("radial_knn", k_neighbors=7).k_neighbors == 7
    assert parse_strategy("radial_2nn", use_sparse=True).weighting == "sparsemax"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("radial", "must end with"),
        ("bogus_2nn", "unknown spatial penalty 'bogus'"),
        ("0nn", "k_neighbors must be >= 1"),
    ],
)
def test_bad_strategies_are_named(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_strategy(text)
