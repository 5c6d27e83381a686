"""The three Res2CLIP branches as batch-first tensor functions (authors' `test.py`).

All inputs are already L2-normalised where the authors normalise (query/reference tokens, global
embeddings, text residuals); adapters, when used, are applied by the caller to the residuals.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unit(x: Tensor) -> Tensor:
    """L2-normalise the last dimension (the authors' `x / x.norm(dim=-1, keepdim=True)`)."""
    return x / x.norm(dim=-1, keepdim=True)


def text_map(query_tokens: Tensor, text_residual: Tensor) -> Tensor:
    """Text branch <F_q, R_t>: [B, L, D] x [D] (or [B, D]) -> [B, L]."""
    return _dot(query_tokens, text_residual)


def visual_map(visual_residual: Tensor) -> Tensor:
    """Visual branch ||R_v||_2 per token: [B, L, D] -> [B, L]."""
    return visual_residual.norm(p=2, dim=-1)


def alignment_map(visual_residual: Tensor, text_residual: Tensor) -> Tensor:
    """Residual-alignment branch clamp(R_v . R_t_res, 0): [B, L, D] -> [B, L]."""
    return _dot(visual_residual, text_residual).clamp(min=0)


def global_text_score(query_global: Tensor, text_residual: Tensor) -> Tensor:
    """s_text_cls = <f_q, R_t> for unit global embeddings [B, E] -> [B]."""
    return (query_global * text_residual).sum(dim=-1)


def global_residual(query_global: Tensor, reference_globals: Tensor) -> Tensor:
    """R_v_cls = f_q - norm(mean_k f_ref_k); f_q [B, E] and f_ref [K, E] unit-norm -> [B, E]."""
    reference_mean = unit(reference_globals.mean(dim=0, keepdim=True))
    return query_global - reference_mean


def global_alignment_score(global_visual_residual: Tensor, text_residual: Tensor) -> Tensor:
    """s_res_cls = clamp(R_v_cls . R_t_res, 0): [B, E] -> [B]."""
    return (global_visual_residual * text_residual).sum(dim=-1).clamp(min=0)


def _dot(tokens: Tensor, direction: Tensor) -> Tensor:
    if direction.ndim == 1:
        return tokens @ direction
    return torch.einsum("bld,bd->bl", tokens, direction)
