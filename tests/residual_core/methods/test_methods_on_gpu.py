"""Every built-in method scores on a CUDA device as it does on the CPU: the same model and bank, moved.

The device picks different code paths: the exact search's whole-bank blocks, ResAD++'s whole-batch flow
steps and its matching budget, the blur matrices beside convolutions, the folded backbone's convolutions
in cuDNN. They may change float rounding only. TF32 is off, as the pipelines turn it off on a GPU
(`workflows.pipelines.ray_runtime.full_float32_on_gpu`). These run under `pytest -m gpu` on a CUDA
machine (`benchmarks/gpu_check.sh`) and skip everywhere else."""

from __future__ import annotations

import copy

import pytest
import torch

from residual_core.backbones import create_backbone
from residual_core.bank import build_bank
from residual_core.methods import create_method

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

IMAGE_SIZE = 128  # 32x32 tokens at stride 4: the stride-4 level's matching is a real few-shot search
SHOTS = 2
METHODS = {  # name -> keyword hyper-parameters (PatchCore keeps every patch: a coreset is a greedy choice
    "baseline": {},  # that float rounding may turn another way)
    "patchcore": {},
    "res2clip": {},  # the visual branch alone on a CNN backbone
    "resadpp": {"seed": 0},  # untrained modules, seeded: the flows and VQ still run in full
}


def _images(count: int, seed: int) -> torch.Tensor:
    """A shared smooth pattern with per-image noise; every other image gets a bright square."""
    pattern = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    base = torch.nn.functional.interpolate(pattern, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
    generator = torch.Generator().manual_seed(seed)
    images = base + 0.1 * torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    images[1::2, :, 40:72, 40:72] += 2.5
    return images


def _scores(method, bank, images, device: str):
    with torch.no_grad():
        out = method.to(device).eval().score(images.to(device), bank.to(device))
    return out.anomaly_map.cpu(), out.image_score.cpu()


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * max(scale, 1.0),
                               msg=lambda message: f"{what}: {message}")


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("effnet-lite0", image_size=IMAGE_SIZE).eval()


@pytest.fixture(autouse=True)
def full_float32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_scores_on_the_gpu_as_on_the_cpu(backbone, name, device="cuda"):
    references, queries = _images(SHOTS, seed=1), _images(4, seed=2)
    bank = build_bank(backbone, references, image_ids=[f"ref{i}" for i in range(SHOTS)], dataset="synthetic",
                      category="widget", seed=0)
    torch.manual_seed(0)
    method = create_method(name, copy.deepcopy(backbone), **METHODS[name])
    on_cpu = _scores(method, bank, queries, "cpu")
    on_device = _scores(method, bank, queries, device)
    _close(on_device[0], on_cpu[0], f"{name} anomaly maps")
    _close(on_device[1], on_cpu[1], f"{name} image scores")
