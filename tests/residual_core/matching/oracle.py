"""A slow, literal restatement of Res2CLIP's matching formulas used as a test oracle.

Square grid, references laid out as k_shot whole grids (the authors' [1, k_shot*L, D] layout), dense
[B, L, k_shot*L] matrices, float64.
"""

import math

import torch
import torch.nn.functional as F


def penalty_matrix(kind, side, k_shot, gamma):
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    y = rows.flatten().double() - (side - 1) / 2
    x = cols.flatten().double() - (side - 1) / 2
    radius = torch.sqrt(x**2 + y**2)
    radial = (radius[:, None] - radius[None, :]).abs()
    euclid = torch.sqrt((y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2)
    angle = torch.atan2(y, x)
    angle = (angle[:, None] - angle[None, :]).abs()
    angle = torch.minimum(angle, 2 * math.pi - angle)
    max_radius = math.sqrt(2) * (side - 1) / 2
    values = {
        "local": euclid,
        "radial": radial,
        "radial_new": radial / (max_radius + 1e-6),
        "radial_margin": (radial - 2).clamp_min(0),
        "radial_laplace": 1 - torch.exp(-radial),
        "polar_linear": radial + angle,
        "polar": (1 - torch.exp(-(radial**2) / 2))
        + 0.1 * (1 - torch.exp(-(angle**2) / (2 * (math.pi / 4) ** 2))),
        "radial_euc": radial / (max_radius + 1e-6) + euclid / (math.sqrt(2) * (side - 1) + 1e-6),
        "euc_new": 1 - torch.exp(-(euclid - 2).clamp_min(0)),
    }[kind]
    return gamma * values.repeat(1, k_shot)


def pooled(tokens, side):
    maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    maps = F.avg_pool2d(F.pad(maps, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    out = maps.reshape(tokens.shape[0], tokens.shape[2], -1).transpose(1, 2)
    return out / out.norm(dim=-1, keepdim=True)


def simplex_projection(z):
    ordered, _ = z.sort(dim=-1, descending=True)
    cumulative = ordered.cumsum(-1) - 1
    ranks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    support = (ordered - cumulative / ranks) > 0
    count = support.sum(-1, keepdim=True)
    tau = cumulative.gather(-1, count - 1) / count
    return (z - tau).clamp_min(0)


def oracle_match(query, reference, k_shot, strategy, pooling=False):
    """query [B, L, D], reference [k_shot*L, D], both normalised. Returns matched [B, L, D]."""
    q, r = query.double(), reference.double()
    side = int(round(q.shape[1] ** 0.5))
    sim = q @ r.T
    search = sim
    if pooling:
        pooled_reference = pooled(r.view(k_shot, -1, r.shape[1]), side).reshape_as(r)
        search = (pooled(q, side) @ pooled_reference.T + sim) / 2
    if strategy.penalty:
        search = search - penalty_matrix(strategy.penalty, side, k_shot, strategy.spatial_penalty)
    if strategy.weighting == "sparsemax":
        matched = simplex_projection(search) @ r
    elif strategy.weighting == "softmax":
        _, top = search.topk(strategy.k_neighbors, dim=-1)
        weights = torch.softmax(sim.gather(-1, top) / strategy.temperature, dim=-1)
        matched = (weights[..., None] * r[top]).sum(-2)
    else:
        matched = r[search.argmax(-1)]
    return matched / matched.norm(dim=-1, keepdim=True)
