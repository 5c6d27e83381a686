import pytest
import torch

from residual_core import faiss_index
from residual_core.faiss_index import IndexSpec


def data(n=2000, d=32, q=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(q, d, generator=g)


def exact_top1(base, queries):
    return (faiss_index.normalise_rows(queries) @ faiss_index.normalise_rows(base).T).argmax(-1)


def test_flat_index_is_exact_cosine_search():
    base, queries = data()
    index = faiss_index.build_index(base)
    scores, ids = faiss_index.search(index, faiss_index.normalise_rows(queries), 5)
    assert ids.shape == (100, 5) and ids.dtype == torch.long
    assert torch.equal(ids[:, 0], exact_top1(base, queries))
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert faiss_index.index_is_exact(index)


@pytest.mark.parametrize(
    ("spec", "min_recall"),
    [
        (IndexSpec(kind="ivf", nlist=8, nprobe=8), 1.0),  # probing every list is exhaustive
        (IndexSpec(kind="ivf", nlist=32, nprobe=4), 0.3),
        (IndexSpec(kind="hnsw", hnsw_m=16, ef_search=128), 0.9),
    ],
)
def test_approximate_indexes_have_reasonable_recall(spec, min_recall):
    base, queries = data()
    index = faiss_index.build_index(base, spec)
    _, ids = faiss_index.search(index, faiss_index.normalise_rows(queries), 1)
    recall = (ids[:, 0] == exact_top1(base, queries)).float().mean().item()
    assert recall >= min_recall
    assert not faiss_index.index_is_exact(index)


def test_serialisation_round_trip(tmp_path):
    base, queries = data(n=500)
    for spec in (IndexSpec(), IndexSpec(kind="ivf", nlist=4), IndexSpec(kind="hnsw")):
        index = faiss_index.build_index(base, spec)
        faiss_index.save_index(index, tmp_path / "index.faiss")
        loaded = faiss_index.load_index(tmp_path / "index.faiss")
        again = faiss_index.index_from_bytes(faiss_index.index_to_bytes(index))
        queries_n = faiss_index.normalise_rows(queries)
        for other in (loaded, again):
            assert torch.equal(
                faiss_index.search(other, queries_n, 3)[1], faiss_index.search(index, queries_n, 3)[1]
            )
        assert faiss_index.index_memory_bytes(index) > 0


def test_spec_parsing_and_validation():
    assert IndexSpec.parse("flat") == IndexSpec()
    assert IndexSpec.parse("ivf:nlist=256,nprobe=8") == IndexSpec(kind="ivf", nlist=256, nprobe=8)
    assert IndexSpec.parse("HNSW: hnsw_m=16") == IndexSpec(kind="hnsw", hnsw_m=16)
    with pytest.raises(ValueError, match="not one of"):
        IndexSpec.parse("lsh")
    with pytest.raises(ValueError, match="bad option"):
        IndexSpec.parse("ivf:bogus=3")
    with pytest.raises(ValueError, match="needs an integer"):
        IndexSpec.parse("ivf:nlist=x")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        IndexSpec(kind="ivf", nprobe=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="non-empty"):
        faiss_index.build_index(torch.zeros(0, 4))
    index = faiss_index.build_index(torch.randn(10, 4))
    with pytest.raises(ValueError, match="queries must be"):
        faiss_index.search(index, torch.randn(3, 5), 1)


def test_cpu_placement_without_gpu():
    index = faiss_index.build_index(torch.randn(50, 8))
    assert faiss_index.to_device(index, "cpu") is index
    if not faiss_index.gpu_available():
        assert faiss_index.to_device(index, "auto") is index
        with pytest.raises(RuntimeError, match="no GPU support"):
            faiss_index.to_device(index, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not faiss_index.gpu_available(), reason="needs a FAISS GPU build and a visible GPU")
def test_gpu_index_matches_cpu():
    base, queries = data()
    cpu = faiss_index.build_index(base)
    gpu = faiss_index.to_device(cpu, "cuda")
    assert faiss_index.gpu_resources() is faiss_index.gpu_resources()  # one per process
    queries_n = faiss_index.normalise_rows(queries)
    assert torch.equal(faiss_index.search(gpu, queries_n, 1)[1], faiss_index.search(cpu, queries_n, 1)[1])
    assert faiss_index.index_is_exact(gpu)
