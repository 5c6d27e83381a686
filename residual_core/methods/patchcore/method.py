"""PatchCore (Roth et al., CVPR 2022) on the project's reference banks; see docs/methods/patchcore.md.

Training-free. The memory bank is built from a `ReferenceBank`'s raw per-layer features in `score()`
(locally aware patch features of every reference patch, optionally a greedy k-center coreset) and cached
per bank object, so a scoring actor that reuses one bank across batches builds it once.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from residual_core import coreset
from residual_core.methods.base import AnomalyMethod, MethodError, ScoreOutput
from residual_core.methods.patchcore import scoring
from residual_core.methods.patchcore.config import PatchCoreConfig
from residual_core.methods.patchcore.features import bank_layer_maps, patch_embeddings, tokens_to_map
from residual_core.methods.registry import register_method

REFERENCE_CHUNK = 4  # reference images embedded at once (bounds the unfolded maps' memory)
MAX_CACHED_BANKS = 8  # memory banks kept per method (the scoring actor keeps up to 8 banks)


class PatchCore(AnomalyMethod):
    """Nearest-neighbour distance of locally aware patch features to the references' memory bank."""

    name = "patchcore"
    trainable = False

    def __init__(self, backbone, config: PatchCoreConfig | None = None, **overrides) -> None:
        super().__init__(backbone)
        if config is None:
            config = PatchCoreConfig.from_dict(overrides)
        elif overrides:
            raise MethodError("patchcore: pass either a PatchCoreConfig or keyword options, not both")
        self.config = config
        identity = getattr(backbone, "identity", None)
        if identity is None or not getattr(identity, "layers", None):
            raise MethodError("patchcore: the backbone has no `identity.layers` to choose the layers from")
        self.backbone_layers = tuple(int(v) for v in identity.layers)
        missing = [layer for layer in config.layers if layer not in self.backbone_layers]
        if missing:
            raise MethodError(f"patchcore: layers {missing} are not among the backbone's layers "
                              f"{self.backbone_layers}; set the method's `layers` or the backbone's")
        self.preprocess = config.preprocess
        # id(bank) -> (weak reference to the bank, device, memory bank [M, D])
        self._memory_cache: OrderedDict[int, tuple[weakref.ref, torch.device, Tensor]] = OrderedDict()

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def __getstate__(self) -> dict:  # pickling / deepcopy: the cache (weak references) is not part of it
        state = self.__dict__.copy()
        state["_memory_cache"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ features
    def _embed_maps(self, maps: list[Tensor]) -> tuple[Tensor, tuple[int, int]]:
        config = self.config
        return patch_embeddings(maps, patchsize=config.patchsize,
                                pretrain_dim=config.pretrain_embed_dimension,
                                target_dim=config.target_embed_dimension)

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int], list[tuple[int, int]]]:
        """Images [B, 3, S, S] -> (patch features [B, h*w, D], (h, w), the chosen layers' grids)."""
        features = self.backbone.forward_features(images.to(self.device))
        if len(features.patch_tokens) != len(self.backbone_layers):
            raise MethodError(f"patchcore: the backbone gave {len(features.patch_tokens)} layers, its "
                              f"identity names {len(self.backbone_layers)}")
        maps, grids = [], []
        for layer in self.config.layers:
            position = self.backbone_layers.index(layer)
            grid = tuple(int(v) for v in features.grids[position])
            maps.append(tokens_to_map(features.patch_tokens[position], grid))
            grids.append(grid)
        embeddings, grid = self._embed_maps(maps)
        return embeddings, grid, grids

    def memory_bank(self, bank) -> Tensor:
        """The memory bank [M, D] of `bank` on this method's device (built once per bank object)."""
        device = self.device
        key = id(bank)
        cached = self._memory_cache.get(key)
        if cached is not None and cached[0]() is bank and cached[1] == device:
            self._memory_cache.move_to_end(key)
            return cached[2]
        memory = self._build_memory(bank, device)
        cache = self._memory_cache

        def forget(ref: weakref.ref, key: int = key) -> None:  # the bank was collected: free its memory
            entry = cache.get(key)
            if entry is not None and entry[0] is ref:
                del cache[key]

        cache[key] = (weakref.ref(bank, forget), device, memory)
        cache.move_to_end(key)
        while len(cache) > MAX_CACHED_BANKS:
            cache.popitem(last=False)
        return memory

    def _bank_maps(self, bank) -> list[Tensor]:
        bank_layers = [int(v) for v in bank.header.layers]
        missing = [layer for layer in self.config.layers if layer not in bank_layers]
        if missing:
            raise MethodError(f"patchcore: the bank lacks layers {missing} (bank layers {bank_layers})")
        maps = []
        for layer in self.config.layers:
            index = bank_layers.index(layer)
            maps.append(bank_layer_maps(bank.features[index], bank.positions[index], bank.grids[index],
                                        layer=layer))
        if len({int(m.shape[0]) for m in maps}) != 1:
            raise MethodError(f"patchcore: bank layers hold different numbers of references "
                              f"{[int(m.shape[0]) for m in maps]}")
        return maps

    @torch.no_grad()
    def _build_memory(self, bank, device: torch.device) -> Tensor:
        maps = self._bank_maps(bank)
        parts = []
        for start in range(0, int(maps[0].shape[0]), REFERENCE_CHUNK):
            chunk = [m[start:start + REFERENCE_CHUNK].to(device=device, dtype=torch.float32) for m in maps]
            embeddings, _ = self._embed_maps(chunk)
            parts.append(embeddings.reshape(-1, embeddings.shape[-1]))
        memory = torch.cat(parts)
        fraction = self.config.coreset_fraction
        if fraction is not None and fraction < 1.0:
            # ApproximateGreedyCoresetSampler: int(N * percentage) samples (at least one here)
            size = max(1, int(memory.shape[0] * fraction))
            chosen = coreset.greedy_k_center(memory, size, seed=self.config.coreset_seed,
                                             projection_dim=self.config.coreset_projection_dim)
            memory = memory[chosen]
        return memory.contiguous()

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, images: Tensor, bank) -> ScoreOutput:
        if images.ndim != 4:
            raise MethodError(f"images must be [B, 3, S, S], got shape {tuple(images.shape)}")
        config = self.config
        memory = self.memory_bank(bank)
        query, grid, grids = self.embed(images)
        bank_grids = {int(layer): tuple(g) for layer, g in zip(bank.header.layers, bank.grids, strict=True)}
        for layer, layer_grid in zip(config.layers, grids, strict=True):
            if bank_grids[layer] != layer_grid:
                raise MethodError(f"patchcore: layer {layer} grid {layer_grid} differs from the bank's "
                                  f"{bank_grids[layer]} (another image size?)")
        batch, patches, dim = query.shape
        flat = query.reshape(-1, dim)
        squared, nearest = scoring.nearest_neighbours(flat, memory, config.anomaly_score_num_nn)
        scores = scoring.patch_scores(squared, config.patch_distance).reshape(batch, patches)
        image_score = scores.amax(dim=1)
        if config.image_score == "reweighted":
            star = scores.argmax(dim=1)  # m_test*: the patch of the largest score
            rows = torch.arange(batch, device=flat.device) * patches + star
            test_patch = flat[rows]
            m_star = memory[nearest[rows, 0]]
            _, neighbour_index = scoring.nearest_neighbours(m_star, memory, config.reweight_neighbours)
            weight = scoring.reweighting(test_patch, m_star, memory[neighbour_index])
            image_score = weight * image_score
        size = (int(images.shape[-2]), int(images.shape[-1]))
        anomaly_map = scoring.anomaly_maps(scores.reshape(batch, *grid), size, config.smoothing_sigma)
        return ScoreOutput(
            anomaly_map=anomaly_map.float(),
            image_score=image_score.float(),
            branch_scores={"visual": image_score.float()},
            branches=("visual",),
        )


def patchcore_preprocess(params: dict) -> str:
    """The preset PatchCore uses with keyword hyper-parameters `params` (validated like create_method)."""
    return PatchCoreConfig.from_dict(dict(params)).preprocess


@register_method("patchcore", preprocess=patchcore_preprocess)
def build_patchcore(backbone, **config) -> PatchCore:
    return PatchCore(backbone, **config)
