"""The blocked exact search equals the dense [queries x references] computation it replaces."""

import faiss
import pytest
import torch

from residual_core.matching import knn
from residual_core.matching.knn import BlockShape, block_shape, exact_search, nearest

# rows x columns x chunk: blocks that do not divide the sizes, one-row / one-column blocks,
# chunks with a short tail, no chunking, a block holding everything
SHAPES = [
    BlockShape(7, 13, 4),
    BlockShape(1, 1, 1),
    BlockShape(5, 64, 8),
    BlockShape(3, 50, 7),
    BlockShape(64, 37, 1),
    BlockShape(1000, 1000, 64),
    None,  # the heuristic
]
# the torch kernel at every block shape, and FAISS's flat search (the "auto" choice on CPU)
CASES = [pytest.param(shape, "torch", id=f"torch-{shape}") for shape in SHAPES] + [
    pytest.param(None, "faiss", id="faiss")
]


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def data(queries=29, references=101, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(queries, dim, generator=g), torch.randn(references, dim, generator=g)


def dense(query, reference, k, metric):
    """What the code did before: the full score matrix, then topk / argmax."""
    if metric == "l2":
        distances = torch.cdist(query.double(), reference.double()).square()
        return distances.topk(k, dim=1, largest=False)
    if metric == "cosine":
        query, reference = unit(query), unit(reference)
    return (query.double() @ reference.double().T).topk(k, dim=1)


def assert_ties_free(query, reference, k, metric, margin=1e-5):
    """The test data separate the k + 1 best scores by more than float rounding."""
    values, _ = dense(query, reference, min(k + 1, reference.shape[0]), metric)
    gaps = (values[:, :-1] - values[:, 1:]).abs()
    assert gaps.numel() == 0 or float(gaps.min()) > margin


@pytest.mark.parametrize(("shape", "backend"), CASES)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_equals_dense_top_k(shape, backend, metric, k):
    query, reference = data(seed=k)
    assert_ties_free(query, reference, k, metric)
    scores, indices = exact_search(query, reference, k, metric=metric, shape=shape, backend=backend)
    expected_scores, expected_indices = dense(query, reference, k, metric)
    assert indices.shape == (29, k) and indices.dtype == torch.long
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores.double(), expected_scores, atol=2e-5, rtol=1e-5)


LARGER_SHAPES = [BlockShape(37, 200, 16), BlockShape(64, 37, 1), BlockShape(128, 513, 64), None]


@pytest.mark.parametrize(
    ("shape", "backend"),
    [*[(shape, "torch") for shape in [*LARGER_SHAPES, BlockShape(300, 1500, 64)]], (None, "faiss")],
)
def test_top1_equals_argmax_of_the_similarity_matrix(shape, backend):
    query, reference = data(queries=300, references=1500, dim=24, seed=3)
    query, reference = unit(query), unit(reference)
    assert_ties_free(query, reference, 1, "ip", margin=1e-6)
    scores, indices = nearest(query, reference, shape=shape, backend=backend)
    similarity = query @ reference.T
    assert torch.equal(indices, similarity.argmax(dim=1))
    torch.testing.assert_close(scores, similarity.amax(dim=1))


@pytest.mark.parametrize("block_bytes", [4, 256, 4096, 1 << 16, None])
def test_memory_budget_does_not_change_results(block_bytes):
    query, reference = data(queries=40, references=500, seed=4)
    expected = exact_search(query, reference, 4, block_bytes=1 << 30, backend="torch")
    result = exact_search(query, reference, 4, block_bytes=block_bytes, backend="torch")
    assert torch.equal(result[1], expected[1])
    torch.testing.assert_close(result[0], expected[0])


@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
def test_batch_first_shapes_and_dtypes(backend):
    query, reference = data(queries=24, references=50)
    batched = exact_search(query.view(2, 3, 4, 12), reference, 2, metric="cosine", backend=backend)
    flat = exact_search(query, reference, 2, metric="cosine", backend=backend)
    assert batched[0].shape == (2, 3, 4, 2) and batched[1].shape == (2, 3, 4, 2)
    assert torch.equal(batched[1].reshape(24, 2), flat[1])
    if backend != "faiss":  # float64 runs on the torch kernel
        doubled = exact_search(query.double(), reference.double(), 2, metric="cosine", backend=backend)
        assert doubled[0].dtype == torch.float64 and torch.equal(doubled[1], flat[1])
    scores, indices = nearest(query.view(4, 6, 12), reference, backend=backend)
    assert scores.shape == indices.shape == (4, 6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_empty_and_one_row_edge_cases(backend):
    query, reference = data(queries=5, references=9)
    scores, indices = exact_search(query[:0], reference, 3, backend=backend)
    assert scores.shape == indices.shape == (0, 3)
    scores, indices = exact_search(query, reference[:0], 3, backend=backend)  # no references
    assert scores.shape == indices.shape == (5, 0)
    with pytest.raises(ValueError, match="empty reference"):
        nearest(query, reference[:0], backend=backend)
    scores, indices = exact_search(query, reference[:1], 4, backend=backend)  # k > N: all N references
    assert indices.shape == (5, 1) and torch.equal(indices, torch.zeros(5, 1, dtype=torch.long))
    torch.testing.assert_close(scores[:, 0], query @ reference[0])
    scores, indices = exact_search(query[:1], reference, 9, backend=backend)  # one query, k = N
    assert torch.equal(indices[0], (query[:1] @ reference.T)[0].argsort(descending=True))
    for shape in SHAPES if backend == "torch" else [None]:
        _, one = nearest(query[2:3], reference, shape=shape, backend=backend)
        assert one.tolist() == [int((query[2] @ reference.T).argmax())]


@pytest.mark.parametrize("shape", [*SHAPES, BlockShape(4, 8, 4)])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_ties_go_to_the_lowest_index_like_argmax(shape, metric):
    """Torch kernel: duplicate reference vectors in other blocks, other chunks and the same chunk: the
    first one wins."""
    backend = "torch"
    query, reference = data(queries=30, references=40, dim=8, seed=5)
    reference[3] = reference[2]  # in the same chunk
    reference = torch.cat([reference, reference, reference[:20]])  # rows i, i + 40 (, i + 80) equal
    scores, indices = nearest(query, reference, shape=shape, backend=backend, metric=metric)
    if metric == "l2":
        expected = torch.cdist(query, reference).argmin(dim=1)
    else:
        expected = (query @ reference.T).argmax(dim=1)
    assert torch.equal(indices, expected)
    assert bool((indices < 40).all())


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_ties_across_large_blocks(metric):
    """The same where the torch kernel runs several column blocks (the last one shorter)."""
    query, reference = data(queries=3000, references=2000, dim=24, seed=8)
    reference = torch.cat([reference, reference])
    expected = torch.cdist(query, reference).argmin(1) if metric == "l2" else (query @ reference.T).argmax(1)
    for shape in (BlockShape(300, 1000, 64), BlockShape(1000, 1536, 64), None):
        _, indices = nearest(query, reference, shape=shape, backend="torch", metric=metric)
        assert bool((indices < 2000).all())
        assert torch.equal(indices, expected)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_resolves_exact_ties_to_one_of_the_tied_references(metric):
    """FAISS's flat search may return any copy of a duplicated reference (documented): the same vector."""
    query, reference = data(queries=30, references=40, dim=8, seed=5)
    reference = torch.cat([reference, reference, reference[:20]])
    _, indices = nearest(query, reference, backend="faiss", metric=metric)
    _, first = nearest(query, reference, backend="torch", metric=metric)
    assert torch.equal(indices % 40, first) and torch.equal(reference[indices], reference[first])


def faiss_settings() -> tuple:
    cvar = faiss.cvar
    return (faiss.omp_get_max_threads(), cvar.distance_compute_blas_threshold,
            cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs)


def test_faiss_blas_blocks_equal_dense_and_leave_faiss_settings_alone():
    """500 queries x 3,000 references span two query blocks and two reference blocks of FAISS's BLAS
    search (`FAISS_QUERY_BLOCK` x `FAISS_REFERENCE_BLOCK`): the running top-k crosses both."""
    before = faiss_settings()
    assert knn.FAISS_QUERY_BLOCK < 500 < 2 * knn.FAISS_QUERY_BLOCK and knn.FAISS_REFERENCE_BLOCK < 3000
    query, reference = data(queries=500, references=3000, dim=24, seed=9)
    for metric, k in [("cosine", 1), ("ip", 5), ("l2", 3)]:
        assert_ties_free(query, reference, k, metric)
        scores, indices = exact_search(query, reference, k, metric=metric, backend="faiss")
        expected_scores, expected_indices = dense(query, reference, k, metric)
        assert torch.equal(indices, expected_indices)
        torch.testing.assert_close(scores.double(), expected_scores, atol=2e-5, rtol=1e-5)
    assert faiss_settings() == before


def test_adjust_edits_each_block_like_the_dense_matrix():
    query, reference = data(queries=33, references=90, seed=6)
    bonus = torch.linspace(0, 3, 90)[None] * torch.linspace(1, -1, 33)[:, None]  # [Q, N]

    def adjust(scores, rows, columns):
        return scores.add_(bonus[rows, columns])

    expected = (query @ reference.T + bonus).topk(3, dim=1)
    for shape in SHAPES:
        scores, indices = exact_search(query, reference, 3, adjust=adjust, shape=shape)  # auto: torch
        assert torch.equal(indices, expected.indices)
        torch.testing.assert_close(scores, expected.values)


def test_block_shape_heuristic_bounds_the_block():
    shape = block_shape(50_176, 3_136, 1, block_bytes=2 << 20)
    assert shape.rows * shape.columns * 4 <= 2 << 20 and shape.columns == 3_136 and shape.chunk == knn.CHUNK
    big = block_shape(50_176, 100_000, 1)
    assert big.columns <= knn.MAX_REFERENCE_BLOCK and big.columns % knn.CHUNK == 0
    blocks = -(-100_000 // big.columns)
    assert blocks * big.columns - 100_000 < blocks * knn.CHUNK  # padding: under a chunk per block
    assert block_shape(100, 12_544, 1).columns == 3_136  # 4 shots of 56 x 56: 4 equal blocks
    assert big.rows * big.columns * 4 <= knn.CPU_BLOCK_BYTES
    assert block_shape(10, 10_000, 64).chunk == 1  # 64 best chunks are most of a block: no chunking
    assert block_shape(1, 1, 1) == BlockShape(1, 1, 1)
    assert block_shape(0, 0, 1, block_bytes=1).rows == 1
    gpu = block_shape(50_176, 3_136, 1, device="cuda")
    assert gpu.rows * gpu.columns * 4 <= knn.ACCELERATOR_BLOCK_BYTES and gpu.rows > shape.rows
    assert gpu.chunk == 1  # a GPU's max with indices is as fast as amax: no chunk passes
    assert block_shape(100_352, 12_544, 4, device="cuda").columns == 12_544  # a 4-shot bank in one block
    wide = block_shape(10, 1_000_000, 1, device="cuda")
    assert wide.columns <= knn.ACCELERATOR_MAX_REFERENCE_BLOCK and wide.columns % knn.CHUNK == 0


def test_accelerator_shaped_blocks_give_the_dense_results():
    """The GPU block shape (whole bank, no chunks), run on CPU tensors, finds what the dense scores do."""
    query, reference = data()
    for k in (1, 3):
        shape = block_shape(query.shape[0], reference.shape[0], k, device="cuda")
        scores, indices = exact_search(query, reference, k, shape=shape)
        expected = (query @ reference.T).topk(k, dim=1)
        assert torch.equal(indices, expected.indices)
        torch.testing.assert_close(scores, expected.values)


def test_clear_errors():
    query, reference = data()
    with pytest.raises(ValueError, match="metric"):
        exact_search(query, reference, metric="dot")
    with pytest.raises(ValueError, match="same D"):
        exact_search(query, reference[:, :5])
    with pytest.raises(ValueError, match="k must be"):
        exact_search(query, reference, 0)
    with pytest.raises(ValueError, match="not on L2"):
        exact_search(query, reference, metric="l2", adjust=lambda s, r, c: s)
    with pytest.raises(ValueError, match="backend"):
        exact_search(query, reference, backend="numpy")
    with pytest.raises(ValueError, match="CPU float32"):
        exact_search(query.double(), reference.double(), backend="faiss")


def test_no_gradient_is_recorded():
    query, reference = data()
    scores, _ = exact_search(query.requires_grad_(), reference, 2)
    assert not scores.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    query, reference = data(queries=500, references=3000, dim=24, seed=7)
    for metric in ("cosine", "l2"):
        cpu = exact_search(query, reference, 5, metric=metric, backend="torch")
        gpu = exact_search(query.cuda(), reference.cuda(), 5, metric=metric)
        assert gpu[1].device.type == "cuda"
        assert torch.equal(gpu[1].cpu(), cpu[1])
        torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=1e-4)
