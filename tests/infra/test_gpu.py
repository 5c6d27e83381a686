"""The CUDA path: FAISS GPU indexes, scoring actors with `num_gpus=1`, evaluation on the GPU matching the
CPU. These run on a machine with a GPU (`pytest -m gpu`) and skip with the reason everywhere else."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device here: the GPU path (FAISS GPU, num_gpus actors) needs one"),
]


def test_faiss_gpu_index_matches_cpu_search():
    from residual_core import faiss_index

    if not faiss_index.gpu_available():
        pytest.skip("FAISS has no GPU support in this environment (install the `gpu` extra: faiss-gpu-cu12)")
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(5000, 64, generator=generator), torch.randn(200, 64, generator=generator)
    cpu = faiss_index.build_index(bank)
    gpu = faiss_index.to_device(faiss_index.build_index(bank), "cuda")
    cpu_scores, cpu_ids = faiss_index.search(cpu, faiss_index.normalise_rows(queries), 1)
    gpu_scores, gpu_ids = faiss_index.search(gpu, faiss_index.normalise_rows(queries), 1)
    assert (cpu_ids == gpu_ids).float().mean() > 0.99
    torch.testing.assert_close(gpu_scores, cpu_scores, atol=1e-4, rtol=1e-4)


def test_evaluate_with_gpu_actors_matches_cpu(tmp_path):
    ray = pytest.importorskip("ray")
    from tests.faults.helpers import assert_same_metrics, config, result_rows
    from tests.workflows.pipelines.tiny_data import write_tiny
    from workflows.pipelines.evaluate import run_evaluate
    from workflows.pipelines.ray_runtime import gpus_per_worker

    data = write_tiny(str(tmp_path / "data"), n_train=2, n_normal=3, n_anomalous=3)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        assert gpus_per_worker(None) == 1.0  # actors ask for a GPU when the cluster has one
        (on_gpu,) = run_evaluate(config(data, str(tmp_path / "gpu"), "device=auto"), progress=False)
        (on_cpu,) = run_evaluate(config(data, str(tmp_path / "cpu"), "device=cpu",
                                        "evaluate.num_gpus_per_actor=0"), progress=False)
    finally:
        ray.shutdown()
    gpu_rows, cpu_rows = result_rows(on_gpu.job_url), result_rows(on_cpu.job_url)
    assert [r["image_id"] for r in gpu_rows] == [r["image_id"] for r in cpu_rows]
    gpu_scores = torch.tensor([r["image_score"] or 0.0 for r in gpu_rows])
    cpu_scores = torch.tensor([r["image_score"] or 0.0 for r in cpu_rows])
    torch.testing.assert_close(gpu_scores, cpu_scores, atol=1e-3, rtol=1e-3)
    assert_same_metrics(on_gpu.per_category, on_cpu.per_category)
