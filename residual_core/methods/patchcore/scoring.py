"""PatchCore scoring: nearest memory-bank patches, patch scores, the image score and the anomaly map.

- Patch score (`common.py: NearestNeighbourScorer.predict` over `FaissNN`, an `IndexFlatL2`): the mean
  over the `anomaly_score_num_nn` nearest memory-bank patches of the distance; FAISS' flat L2 index returns
  *squared* Euclidean distances, so the released code scores with squared distances ("squared_l2"); the
  paper writes the Euclidean distance ("l2", the default here).
- Image score: the released code takes the maximum patch score (`PatchMaker.score`); the paper (eq. 7)
  reweights it: with m_test* the patch of the largest score, m* its nearest memory-bank patch and N_b(m*)
  the b nearest memory-bank patches of m* (m* itself included),
      w = 1 - exp(||m_test* - m*||) / sum_{m in N_b(m*)} exp(||m_test* - m||),   s = w * s*,
  computed as 1 - exp(d* - logsumexp(d)) so large distances cannot overflow.
- Anomaly map (`RescaleSegmentor`): patch scores on the grid, bilinear resize (align_corners=False) to
  the input size, then scipy's `gaussian_filter(sigma=4)` (mode "reflect", truncate 4).

`nearest_neighbours` ranks with the project's exact blocked k-NN (`residual_core.matching.knn`, metric
"l2": no [queries x memory] matrix), then recomputes the chosen distances as sum((q - m)^2), so
identical rows give exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from residual_core.matching import knn
from residual_core.methods.base import MethodError
from residual_core.methods.filters import gaussian_blur

CPU_BLOCK_BYTES = 16 << 20
ACCELERATOR_BLOCK_BYTES = 256 << 20


def nearest_neighbours(
    query: Tensor, memory: Tensor, k: int = 1, *, block_bytes: int | None = None
) -> tuple[Tensor, Tensor]:
    """The k nearest memory rows of each query row by Euclidean distance, exactly.

    query [Q, D], memory [M, D] -> (squared distances [Q, k'], indices [Q, k'] long), nearest first,
    k' = min(k, M). `block_bytes` bounds the search's score blocks (and the recomputation's chunks)."""
    if memory.ndim != 2 or query.ndim != 2 or query.shape[1] != memory.shape[1]:
        raise MethodError(f"patchcore: need query [Q, D] and memory [M, D], got {tuple(query.shape)} "
                          f"and {tuple(memory.shape)}")
    if memory.shape[0] == 0:
        raise MethodError("patchcore: the memory bank is empty")
    k = min(int(k), int(memory.shape[0]))
    _, index = knn.exact_search(query, memory, k, metric="l2", block_bytes=block_bytes)
    budget = block_bytes or (CPU_BLOCK_BYTES if memory.device.type == "cpu" else ACCELERATOR_BLOCK_BYTES)
    rows = max(1, budget // (4 * k * int(memory.shape[1])))
    distances, indices = [], []
    for start in range(0, query.shape[0], rows):  # exact distances of the chosen rows, chunk by chunk
        chosen = index[start:start + rows]
        exact = (query[start:start + rows].unsqueeze(1) - memory[chosen]).square().sum(dim=2)
        exact, order = exact.sort(dim=1)
        distances.append(exact)
        indices.append(chosen.gather(1, order))
    return torch.cat(distances), torch.cat(indices)


def patch_scores(squared: Tensor, distance: str) -> Tensor:
    """[Q, k] squared distances -> [Q] patch scores: mean over k of the squared ("squared_l2") or plain
    ("l2") distances."""
    if distance not in ("l2", "squared_l2"):
        raise MethodError(f"patchcore: unknown patch distance {distance!r}")
    values = squared if distance == "squared_l2" else squared.clamp_min(0).sqrt()
    return values.mean(dim=1)


def reweighting(test_patch: Tensor, nearest: Tensor, neighbours: Tensor) -> Tensor:
    """Paper eq. 7's w for B images: test_patch [B, D] (m_test*), nearest [B, D] (m*), neighbours
    [B, b, D] (N_b(m*), m* included) -> w [B] = 1 - exp(d*) / sum_j exp(d_j) with Euclidean distances."""
    d_star = (test_patch - nearest).norm(dim=1)
    d_all = (test_patch.unsqueeze(1) - neighbours).norm(dim=2)
    return 1.0 - torch.exp(d_star - torch.logsumexp(d_all, dim=1))


def anomaly_maps(scores: Tensor, size: tuple[int, int], sigma: float) -> Tensor:
    """Patch-score grids [B, h, w] -> [B, H, W]: bilinear resize (align_corners=False), Gaussian blur."""
    maps = F.interpolate(scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return gaussian_blur(maps, sigma) if sigma > 0 else maps
