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
    from workflows.pipelines.ray_runtime import ActorPlan, gpus_per_worker, scoring_actors

    data = write_tiny(str(tmp_path / "data"), n_train=2, n_normal=3, n_anomalous=3)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        assert gpus_per_worker(None) == 1.0  # bank and training tasks ask for a GPU when the cluster has one
        assert scoring_actors(None, None, 2) == ActorPlan(2, 0.5, 1.0)  # two scoring actors share it
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


def _texture_archive(root, per_category: int) -> None:
    """PNG crops of two random textures (no sample photos needed), every fifth with a pasted square,
    in <category>/ folders; four references per category beside them."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for number, category in enumerate(("weave", "speckle")):
        texture = (rng.random((256, 256, 3)) * (60 + 60 * number) + 80).astype(np.uint8)
        for folder, count in (("archive", per_category), ("references", 4)):
            for i in range(count):
                top, left = rng.integers(0, 256 - 64, size=2)
                crop = texture[top:top + 64, left:left + 64].copy()
                if folder == "archive" and i % 5 == 4:
                    crop[20:40, 20:40] = (255, 0, 255)
                path = root / folder / category / f"img-{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()
                Image.fromarray(crop).save(buffer, format="PNG")
                path.write_bytes(buffer.getvalue())


def test_scan_with_gpu_actors_matches_cpu(tmp_path):
    """`scan` with GPU actors (two shard calls at once each) scores and flags as on the CPU."""
    ray = pytest.importorskip("ray")
    from workflows.config import load_config
    from workflows.pipelines.scan import ScanOptions, run_scan
    from workflows.pipelines.scan_outputs import ScanStore

    _texture_archive(tmp_path, per_category=150)
    rows = {}
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        runs = (("gpu", ["device=auto"]), ("cpu", ["device=cpu", "evaluate.num_gpus_per_actor=0"]))
        for name, device in runs:
            overrides = ["backbone.image_size=64", "tracking.enabled=false", "evaluate.batch_size=32",
                         *device]
            options = ScanOptions(input=str(tmp_path / "archive"), output=str(tmp_path / f"out-{name}"),
                                  references=str(tmp_path / "references"), threshold=1e9, shard_size=64)
            summary = run_scan(load_config(None, overrides), options, progress=False)
            assert summary["seen"] == 300
            rows[name] = sorted(ScanStore(options.output).read_table("results").to_pylist(),
                                key=lambda row: row["source"])
    finally:
        ray.shutdown()
    assert [r["source"] for r in rows["gpu"]] == [r["source"] for r in rows["cpu"]]
    gpu_scores = torch.tensor([r["score"] for r in rows["gpu"]])
    cpu_scores = torch.tensor([r["score"] for r in rows["cpu"]])
    torch.testing.assert_close(gpu_scores, cpu_scores, atol=1e-3, rtol=1e-3)
