"""PatchCore: aggregation against an independent computation, scoring, eq. 7, coreset bound, banks, caching,
and the method through `create_method` on the offline effnet-lite0 and a tiny random open_clip ViT."""

from __future__ import annotations

import copy
import gc
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from residual_core.bank import build_bank, coreset_bank
from residual_core.methods import MethodError, create_method, method_preprocess
from residual_core.methods.patchcore import PatchCore, PatchCoreConfig
from residual_core.methods.patchcore import method as patchcore_method
from residual_core.methods.patchcore.features import bank_layer_maps, patch_embeddings
from residual_core.methods.patchcore.scoring import anomaly_maps, nearest_neighbours, reweighting
from tests.residual_core.methods.pooled_pixels import PooledPixels


def _textures(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 4, size // 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _bank(backbone, images):
    return build_bank(backbone, images, image_ids=[f"r{i}" for i in range(len(images))], dataset="d",
                      category="c", seed=0)


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact pairwise Euclidean distances in float64 (no |a|^2 - 2ab + |b|^2 shortcut)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def _small(**overrides) -> dict:
    return {"layers": (0, 1), "pretrain_embed_dimension": 16, "target_embed_dimension": 12, **overrides}


# ------------------------------------------------------------------ independent aggregation reference
def _adaptive_pool_matrix(length: int, out: int) -> torch.Tensor:
    """[length, out] averaging matrix of 1-D adaptive average pooling: bin i covers
    [floor(i L / out), ceil((i + 1) L / out))."""
    matrix = torch.zeros(length, out, dtype=torch.float64)
    for i in range(out):
        start, stop = (i * length) // out, -((-(i + 1) * length) // out)
        matrix[start:stop, i] = 1.0 / (stop - start)
    return matrix


def _bilinear_matrix(out: int, size: int) -> torch.Tensor:
    """[out, size] bilinear interpolation weights (align_corners=False, edge-clamped)."""
    matrix = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):
        src = max((i + 0.5) * size / out - 0.5, 0.0)
        low = min(int(math.floor(src)), size - 1)
        high, lam = min(low + 1, size - 1), src - low
        matrix[i, low] += 1.0 - lam
        matrix[i, high] += lam
    return matrix


def _reference_embeddings(maps, patchsize, pretrain, target):
    """Straightforward float64 PatchCore embedding: zero-padded p x p neighbourhoods by shifting, each
    neighbourhood channel bilinearly resized to the first grid, per-layer pooling, layer aggregation."""
    grid = maps[0].shape[-2:]
    pad = patchsize // 2
    per_layer = []
    for fmap in maps:
        fmap = fmap.double()
        batch, channels, height, width = fmap.shape
        padded = F.pad(fmap, (pad, pad, pad, pad))
        shifted = torch.stack([torch.stack([padded[:, :, dy:dy + height, dx:dx + width]
                                            for dx in range(patchsize)], dim=2)
                               for dy in range(patchsize)], dim=2)  # [B, C, p, p, H, W]
        rows, cols = _bilinear_matrix(grid[0], height), _bilinear_matrix(grid[1], width)
        resized = torch.einsum("ih,bcyxhw,jw->bcyxij", rows, shifted, cols)  # [B, C, p, p, H0, W0]
        vectors = resized.permute(0, 4, 5, 1, 2, 3).reshape(batch, grid[0] * grid[1], -1)
        per_layer.append(vectors @ _adaptive_pool_matrix(vectors.shape[-1], pretrain))
    stacked = torch.cat(per_layer, dim=-1)  # layer-major concatenation
    return stacked @ _adaptive_pool_matrix(stacked.shape[-1], target)


@pytest.mark.parametrize("patchsize", [3, 1, 5])
def test_aggregation_matches_a_straightforward_computation(patchsize):
    torch.manual_seed(0)
    maps = [torch.randn(2, 5, 6, 7), torch.randn(2, 7, 3, 4), torch.randn(2, 3, 2, 2)]
    got, grid = patch_embeddings(maps, patchsize=patchsize, pretrain_dim=40, target_dim=24)
    assert grid == (6, 7) and got.shape == (2, 42, 24)
    expected = _reference_embeddings(maps, patchsize, 40, 24)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_aggregation_when_channels_times_nine_equals_the_dimension_is_the_3x3_mean():
    """WideResNet50 layer3 (1024 channels -> 1024): each output is the channel's zero-padded 3x3 mean."""
    fmap = torch.randn(1, 8, 5, 5)
    got, _ = patch_embeddings([fmap], patchsize=3, pretrain_dim=8, target_dim=8)
    box = F.avg_pool2d(fmap, 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(got[0], box[0].flatten(1).T, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ bank layout
def test_bank_maps_follow_positions_and_refuse_subsampled_banks():
    backbone = PooledPixels()
    bank = _bank(backbone, _textures(3))
    method = create_method("patchcore", backbone, **_small())
    memory = method.memory_bank(bank).clone()
    # the rows of each reference in any order: positions say where they sit
    generator = torch.Generator().manual_seed(1)
    for layer, (height, width) in enumerate(bank.grids):
        cells = height * width
        order = torch.cat([k * cells + torch.randperm(cells, generator=generator) for k in range(3)])
        bank.features[layer] = bank.features[layer][order]
        bank.positions[layer] = bank.positions[layer][order]
    torch.testing.assert_close(PatchCore(backbone, PatchCoreConfig(**_small())).memory_bank(bank), memory)
    with pytest.raises(MethodError, match="whole 16x16 grids"):
        PatchCore(backbone, **_small()).memory_bank(coreset_bank(bank, fraction=0.5))
    duplicated = bank.positions[0].clone()
    duplicated[1] = duplicated[0]
    with pytest.raises(MethodError, match="exactly once"):
        bank_layer_maps(bank.features[0], duplicated, bank.grids[0], layer=0)


# ------------------------------------------------------------------ scoring parts
@pytest.mark.parametrize("k", [1, 3])
def test_blocked_nearest_neighbours_equal_brute_force(k):
    torch.manual_seed(0)
    query, memory = torch.randn(57, 9), torch.randn(41, 9)
    squared, index = nearest_neighbours(query, memory, k, block_bytes=4 * 41 * 5)  # 5 rows per block
    dense = _cdist(query, memory).square()
    expected, expected_index = dense.topk(k, dim=1, largest=False)
    torch.testing.assert_close(squared.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(index, expected_index)
    same, _ = nearest_neighbours(memory[:4], memory, 1)
    assert torch.equal(same, torch.zeros(4, 1))  # exact recomputation: identical rows give exactly 0


def test_reweighting_equals_the_hand_computation():
    memory = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    test_patch = torch.tensor([[0.0, -1.0]])
    m_star = memory[nearest_neighbours(test_patch, memory, 1)[1][:, 0]]
    assert torch.equal(m_star, memory[:1])
    _, neighbours = nearest_neighbours(m_star, memory, 3)  # N_3(m*) = m*, (1, 0), (0, 2)
    assert neighbours.tolist() == [[0, 1, 2]]
    weight = reweighting(test_patch, m_star, memory[neighbours])
    distances = [1.0, math.sqrt(2.0), 3.0]  # ||m_test - m|| for the three neighbours
    expected = 1.0 - math.exp(1.0) / sum(math.exp(d) for d in distances)
    assert weight.item() == pytest.approx(expected, rel=1e-6)
    far = reweighting(test_patch * 1e4, m_star, memory[neighbours] * 1e4)  # exp would overflow
    assert torch.isfinite(far).all() and 0.0 <= far.item() <= 1.0


def test_anomaly_map_is_bilinear_then_scipy_gaussian():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    scores = torch.rand(2, 7, 7, dtype=torch.float64)
    got = anomaly_maps(scores, (40, 40), 4.0)
    upsampled = F.interpolate(scores[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    expected = np.stack([scipy_ndimage.gaussian_filter(m, sigma=4) for m in upsampled.numpy()])
    assert np.abs(got.numpy() - expected).max() < 1e-10


# ------------------------------------------------------------------ the method
def test_defect_scores_highest_and_references_score_zero():
    backbone = PooledPixels()
    references = _textures(2)
    bank = _bank(backbone, references)
    method = create_method("patchcore", backbone, layers=[0, 1])  # YAML lists are fine
    defective = references[:1].clone()
    defective[:, :, 12:20, 12:20] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    out = method.score(torch.cat([references, defective]), bank)
    assert out.anomaly_map.shape == (3, 32, 32) and out.anomaly_map.dtype == torch.float32
    assert out.image_score.shape == (3,) and out.branches == ("visual",)
    assert torch.equal(out.image_score[:2], torch.zeros(2))  # exactly the bank's patches
    assert out.image_score[2] > 0
    query, grid, _ = method.embed(defective)
    squared, _ = nearest_neighbours(query[0], method.memory_bank(bank), 1)
    peak = int(squared[:, 0].argmax())
    assert grid == (16, 16) and 5 <= peak // 16 <= 10 and 5 <= peak % 16 <= 10  # on the square
    assert out.image_score[2] == pytest.approx(squared.max().sqrt().item(), rel=1e-6)  # max L2 distance
    code = create_method("patchcore", backbone, layers=[0, 1], patch_distance="squared_l2")
    assert code.score(defective, bank).image_score.item() == pytest.approx(squared.max().item(), rel=1e-6)
    map_peak = int(out.anomaly_map[2].flatten().argmax())
    assert 10 <= map_peak // 32 <= 21 and 10 <= map_peak % 32 <= 21


def test_scores_are_deterministic_and_batch_independent():
    backbone = PooledPixels()
    bank = _bank(backbone, _textures(2))
    images = _textures(3, seed=5)
    for options in (_small(), _small(patch_distance="squared_l2"),
                    _small(image_score="reweighted", reweight_neighbours=4, anomaly_score_num_nn=2,
                           coreset_fraction=0.3)):
        first = create_method("patchcore", backbone, **options).score(images, bank)
        again = create_method("patchcore", backbone, **options).score(images, bank)
        assert torch.equal(first.image_score, again.image_score)
        assert torch.equal(first.anomaly_map, again.anomaly_map)
        method = create_method("patchcore", backbone, **options)
        single = [method.score(image[None], bank) for image in images]
        torch.testing.assert_close(torch.cat([s.image_score for s in single]), first.image_score)
        torch.testing.assert_close(torch.cat([s.anomaly_map for s in single]), first.anomaly_map)


def test_reweighted_image_score_is_eq7_of_the_max_patch():
    backbone = PooledPixels()
    bank = _bank(backbone, _textures(2))
    images = _textures(2, seed=9)
    method = create_method("patchcore", backbone, **_small(image_score="reweighted", patch_distance="l2",
                                                           reweight_neighbours=5))
    out = method.score(images, bank)
    memory = method.memory_bank(bank).double()
    query, _, _ = method.embed(images)
    for image in range(2):
        distances = _cdist(query[image], memory)  # [patches, M]
        nearest, nearest_index = distances.min(dim=1)
        star = int(nearest.argmax())
        m_star = memory[nearest_index[star]]
        neighbourhood = _cdist(m_star[None], memory)[0].topk(5, largest=False).indices
        d = _cdist(query[image, star][None], memory[neighbourhood])[0]
        weight = 1.0 - torch.exp(nearest[star]) / torch.exp(d).sum()
        assert out.image_score[image].item() == pytest.approx((weight * nearest[star]).item(), rel=1e-4)
    plain = create_method("patchcore", backbone, **_small()).score(images, bank)
    assert (out.image_score < plain.image_score).all()  # w < 1
    torch.testing.assert_close(out.anomaly_map, plain.anomaly_map)  # the map is the same


def test_coreset_shrinks_the_bank_and_keeps_scores_within_the_covering_radius():
    backbone = PooledPixels()
    bank = _bank(backbone, _textures(3))
    images = _textures(2, seed=3)
    full = create_method("patchcore", backbone, **_small())
    reduced = create_method("patchcore", backbone, **_small(coreset_fraction=0.1))
    memory, subset = full.memory_bank(bank), reduced.memory_bank(bank)
    assert subset.shape == (int(memory.shape[0] * 0.1), memory.shape[1])  # int(N * percentage)
    assert _cdist(subset, memory).min(dim=1).values.max() < 1e-6  # a subset of the memory bank
    radius = _cdist(memory, subset).min(dim=1).values.max().item()  # covering radius of the coreset
    exact, approx = full.score(images, bank).image_score, reduced.score(images, bank).image_score
    assert (approx >= exact - 1e-4).all() and (approx <= exact + radius + 1e-4).all()
    assert create_method("patchcore", backbone, **_small(coreset_fraction=1.0)).memory_bank(bank).shape == \
        memory.shape


def test_memory_bank_is_cached_per_bank_object(monkeypatch):
    backbone = PooledPixels()
    method = create_method("patchcore", backbone, **_small())
    calls = []
    build = PatchCore._build_memory
    monkeypatch.setattr(PatchCore, "_build_memory", lambda self, bank, device: calls.append(1) or
                        build(self, bank, device))
    bank = _bank(backbone, _textures(2))
    images = _textures(1, seed=4)
    method.score(images, bank)
    method.score(images, bank)
    assert len(calls) == 1
    other = _bank(backbone, _textures(2, seed=7))
    method.score(images, other)
    assert len(calls) == 2
    del bank
    gc.collect()
    assert len(method._memory_cache) == 1  # a collected bank's memory bank is dropped at once
    monkeypatch.setattr(patchcore_method, "MAX_CACHED_BANKS", 1)
    kept = _bank(backbone, _textures(2, seed=8))
    method.score(images, kept)
    assert len(calls) == 3 and len(method._memory_cache) == 1  # least recently used bank evicted
    method.score(images, other)
    assert len(calls) == 4
    clone = copy.deepcopy(method)  # the weakly keyed cache does not travel
    assert len(clone._memory_cache) == 0 and len(method._memory_cache) == 1
    assert torch.equal(clone.score(images, other).image_score, method.score(images, other).image_score)


def test_config_validation_and_declared_preset():
    assert PatchCoreConfig().to_dict()["layers"] == [2, 3]
    assert PatchCoreConfig.from_dict(PatchCoreConfig(coreset_fraction=0.1).to_dict()) == \
        PatchCoreConfig(coreset_fraction=0.1)
    assert method_preprocess("patchcore") == "patchcore"
    assert method_preprocess("patchcore", {"preprocess": "resad"}) == "resad"
    for bad in ({"layers": []}, {"layers": [2, 2]}, {"layers": "23"}, {"patchsize": 2}, {"patchsize": 0},
                {"target_embed_dimension": 0}, {"patch_distance": "cosine"}, {"image_score": "mean"},
                {"coreset_fraction": 0.0}, {"coreset_fraction": 1.5}, {"smoothing_sigma": -1},
                {"preprocess": "nearest"}, {"reweight_neighbours": 0}, {"k": 1}):
        with pytest.raises(MethodError):
            method_preprocess("patchcore", bad)
    with pytest.raises(MethodError, match="not among the backbone's layers"):
        create_method("patchcore", PooledPixels())  # (2, 3) on a two-layer backbone


# ------------------------------------------------------------------ real backbones
def test_effnet_lite0_through_create_method():
    from residual_core.backbones import create_backbone

    backbone = create_backbone("effnet-lite0", image_size=64)  # levels 1, 2, 3 (strides 4, 8, 16)
    method = create_method("patchcore", backbone)
    assert method.preprocess == "patchcore" and method.config.layers == (2, 3)
    references = _textures(2, size=64)
    bank = _bank(backbone, references)
    assert method.memory_bank(bank).shape == (2 * 8 * 8, 1024)  # stride-8 grid of 64 px, 1024 dims
    defective = references[1:].clone()
    defective[:, :, 20:36, 24:40] = -1.5
    out = method.score(torch.cat([references, defective]), bank)
    assert out.anomaly_map.shape == (3, 64, 64) and torch.isfinite(out.anomaly_map).all()
    assert out.image_score[:2].abs().max() < 1e-3 * out.image_score[2]
    again = create_method("patchcore", backbone, layers=(3, 2)).score(defective, bank)  # layer 3's grid
    assert again.anomaly_map.shape == (1, 64, 64) and again.image_score.item() > 0


def test_tiny_openclip_vit_through_create_method(tiny_openclip_checkpoint):
    from residual_core.backbones import create_backbone

    backbone = create_backbone(tiny_openclip_checkpoint.spec)
    method = create_method("patchcore", backbone, layers=(2, 4), pretrain_embed_dimension=64,
                           target_embed_dimension=64)
    images = torch.randn(3, 3, 64, 64)
    bank = _bank(backbone, images[:2])
    out = method.score(images, bank)
    assert out.anomaly_map.shape == (3, 64, 64) and out.image_score.shape == (3,)
    assert out.image_score[:2].abs().max() < 1e-3 * out.image_score[2]
