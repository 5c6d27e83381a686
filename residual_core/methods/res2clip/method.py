"""The Res2CLIP method: three-branch scoring against a reference bank (authors' `test.py`)."""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from residual_core.matching import MatchStrategy, bank_reference, match_bank_layer, parse_strategy
from residual_core.methods.base import AnomalyMethod, CategoryTrainData, LogFn, MethodError, ScoreOutput
from residual_core.methods.res2clip import branches as br
from residual_core.methods.res2clip import checkpoint as ckpt
from residual_core.methods.res2clip import scoring
from residual_core.methods.res2clip.adapters import Res2ClipAdapters
from residual_core.methods.res2clip.config import Res2ClipConfig, default_config, resolve_plan
from residual_core.methods.res2clip.prompts import TextResiduals, compute_text_residuals

# text residuals per backbone object: the prompt bank is encoded once per model and process
_TEXT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def strategy_of(config: Res2ClipConfig) -> MatchStrategy:
    try:
        return parse_strategy(
            config.match_strategy,
            spatial_penalty=config.spatial_penalty,
            k_neighbors=config.k_neighbors,
            temperature=config.temperature,
            pooling=config.pooling,
        )
    except ValueError as exc:
        raise MethodError(f"res2clip: {exc}") from exc


class Res2Clip(AnomalyMethod):
    """Res2CLIP in training-free (`mode="training-free"`) or fine-tuned (`mode="finetune"`) form."""

    name = "res2clip"

    def __init__(self, backbone, config: Res2ClipConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = config or default_config()
        self.trainable = self.config.mode == "finetune"
        identity = getattr(backbone, "identity", None)
        if identity is None:
            raise MethodError("res2clip: the backbone has no `identity` (layers and image size are needed)")
        self.backbone_layers = tuple(identity.layers)
        has_text = bool(getattr(backbone, "has_text", False))
        self.plan = resolve_plan(self.config, self.backbone_layers, has_text)
        self.strategy = strategy_of(self.config)
        self.training_datasets: list[dict] = []
        self._text: TextResiduals | None = None
        self._references: tuple[object, dict] = (None, {})  # (bank, {layer position: ReferenceSet})
        self.adapters: Res2ClipAdapters | None = None
        self.dims: dict = {}
        if self.trainable:
            self.dims = self._probe_dims()
            token_dims = {int(layer): dim for layer, dim in self.dims["tokens"].items()}
            self.adapters = Res2ClipAdapters(
                self.plan.branches,
                self.plan.visual_layers,
                self.plan.residual_layers,
                token_dims,
                self.dims["embed"],
                self.config.adapter_reduction,
            ).to(self.device)

    # ---------------------------------------------------------------- set-up helpers
    @property
    def uses_text(self) -> bool:
        return "text" in self.plan.branches or "residual" in self.plan.branches

    def text_residuals(self) -> TextResiduals:
        """The frozen text features of the prompt bank, computed once per model (TextFeatureBank)."""
        if not self.uses_text:
            raise MethodError("res2clip: no text branch runs, so there are no text residuals")
        if self._text is None:
            if self.backbone not in _TEXT_CACHE:
                _TEXT_CACHE[self.backbone] = compute_text_residuals(self.backbone.encode_text)
            self._text = _TEXT_CACHE[self.backbone]
        return self._text.to(self.device)

    def _probe_dims(self) -> dict:
        """Token dimension per used layer and the embedding dimension, from one blank image."""
        size = int(self.backbone.image_size)
        with torch.no_grad():
            features = self.backbone.forward_features(torch.zeros(1, 3, size, size, device=self.device))
        tokens = {
            str(layer): int(features.patch_tokens[self.backbone_layers.index(layer)].shape[-1])
            for layer in self.plan.used_layers
        }
        embed = None
        if self.uses_text:
            embed = int(self.text_residuals().anomaly.shape[-1])
        elif features.global_embedding is not None:
            embed = int(features.global_embedding.shape[-1])
        return {"tokens": tokens, "embed": embed}

    def directions(self) -> tuple[Tensor | None, Tensor | None]:
        """(R~_t for the text branch, R~^res_t for the residual branch); adapted in finetune mode."""
        if not self.uses_text:
            return None, None
        r_t = self.text_residuals().anomaly
        r_text, r_res = r_t, r_t
        if self.adapters is not None:
            if self.adapters.text_adapter is not None:
                r_text = br.unit(self.adapters.text_adapter(r_t))
            if self.adapters.res_text_adapter is not None:
                r_res = br.unit(self.adapters.res_text_adapter(r_t))
        return r_text, r_res

    def train(self, mode: bool = True) -> Res2Clip:
        """Adapters follow `mode`; the frozen backbone always stays in eval mode (as the authors')."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def preprocess(self) -> str:
        """The residual_core.preprocess preset of this method's images and masks (config.preprocess)."""
        return self.config.preprocess

    def config_dict(self) -> dict:
        """JSON-ready hyper-parameters plus the layers and branches resolved for this backbone."""
        return json.loads(json.dumps({**self.config.to_dict(), "resolved": self.plan.to_dict()}))

    # ---------------------------------------------------------------- scoring
    def _check_inputs(self, images: Tensor, bank) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise MethodError(f"res2clip: images must be [B, 3, S, S], got {tuple(images.shape)}")
        bank_layers = list(bank.header.layers)
        missing = [layer for layer in self.plan.used_layers if layer not in bank_layers]
        if missing:
            raise MethodError(f"res2clip: the bank lacks layers {missing} (bank layers {bank_layers})")
        saved = bank.header.backbone or {}
        current = ckpt.backbone_identity_dict(self.backbone)
        for key in ("name", "weights_sha256", "image_size"):
            if key in saved and key in current and saved[key] != current[key]:
                raise MethodError(
                    f"res2clip: the bank was built with backbone {key}={saved[key]!r}, "
                    f"the method runs {key}={current[key]!r}"
                )
        if self.uses_text and bank.global_embeddings is None:
            raise MethodError("res2clip: the text/residual branches need the bank's global embeddings")

    @torch.no_grad()
    def score(self, images: Tensor, bank) -> ScoreOutput:
        """Anomaly maps [B, S, S] and image scores [B] for query images [B, 3, S, S] of one category."""
        self._check_inputs(images, bank)
        features = self.backbone.forward_features(images.to(self.device))
        return self.score_features(features, bank, int(images.shape[-1]))

    def score_features(self, features, bank, image_size: int) -> ScoreOutput:
        """Score already extracted `BackboneFeatures` against `bank`."""
        plan, config, device = self.plan, self.config, self.device
        r_text, r_res = self.directions()
        bank_index = {layer: i for i, layer in enumerate(bank.header.layers)}
        layer_maps: dict[str, list[Tensor]] = {name: [] for name in plan.branches}
        for layer in plan.used_layers:
            position = self.backbone_layers.index(layer)
            tokens = br.unit(features.patch_tokens[position].float())
            grid = tuple(features.grids[position])
            batch = tokens.shape[0]
            if "text" in plan.branches and layer in plan.text_layers:
                self._check_dim(tokens, r_text, layer)
                layer_maps["text"].append(br.text_map(tokens, r_text).view(batch, *grid))
            on_visual = "visual" in plan.branches and layer in plan.visual_layers
            on_residual = "residual" in plan.branches and layer in plan.residual_layers
            if not (on_visual or on_residual):
                continue
            j = bank_index[layer]
            residual = tokens - self._matched(tokens, grid, bank, j, layer)
            if on_visual:
                adapted = self._local_adapter("vis_adapters", layer, residual, grid)
                layer_maps["visual"].append(br.visual_map(adapted).view(batch, *grid))
            if on_residual:
                self._check_dim(tokens, r_res, layer)
                adapted = self._local_adapter("res_vis_local_adapters", layer, residual, grid)
                layer_maps["residual"].append(br.alignment_map(adapted, r_res).view(batch, *grid))

        kernel = scoring.gaussian_kernel(config.gaussian_kernel_size, config.gaussian_sigma).to(device)
        branch_maps = {
            name: scoring.average_upsampled(maps, image_size, kernel) for name, maps in layer_maps.items()
        }
        globals_ = self._global_scores(features, bank, r_text, r_res)
        branch_scores = {
            name: scoring.branch_image_score(
                branch_maps[name], globals_.get(name), config.top_fraction, config.global_share
            )
            for name in plan.branches
        }
        return ScoreOutput(
            anomaly_map=scoring.fuse_pixel_maps(branch_maps, config.pixel_weights, kernel).float(),
            image_score=scoring.fuse_image_scores(branch_scores, config.image_weights).float(),
            branch_scores={name: s.float() for name, s in branch_scores.items()},
            branches=plan.branches,
        )

    def _matched(self, tokens: Tensor, grid, bank, j: int, layer: int) -> Tensor:
        """Matched references [B, L, D] (unit-norm) of bank layer position `j` (get_visual_match)."""
        cached_bank, references = self._references
        if cached_bank is not bank:  # normalise a bank once, not per batch (one category at a time)
            references = {}
            self._references = (bank, references)
        key = (j, str(tokens.device))
        try:
            if key not in references:
                references[key] = bank_reference(bank, j, pooling=self.strategy.pooling, device=tokens.device)
            path, reference, strategy = self.config.match_path, references[key], self.strategy
            result = match_bank_layer(tokens, bank, j, strategy, grid=grid, path=path, reference=reference)
            return result.matched
        except ValueError as exc:
            raise MethodError(f"res2clip: matching layer {layer}: {exc}") from exc

    def _local_adapter(self, group: str, layer: int, residual: Tensor, grid) -> Tensor:
        if self.adapters is None:
            return residual
        return getattr(self.adapters, group)[str(layer)](residual, grid)

    def _global_scores(self, features, bank, r_text, r_res) -> dict[str, Tensor]:
        """s_text_cls and s_res_cls (global scores of the text and residual branches)."""
        if not self.uses_text:
            return {}
        if features.global_embedding is None:
            raise MethodError("res2clip: the text/residual branches need the backbone's global embedding")
        query = br.unit(features.global_embedding.float())
        out = {}
        if "text" in self.plan.branches:
            out["text"] = br.global_text_score(query, r_text)
        if "residual" in self.plan.branches:
            references = br.unit(bank.global_embeddings.float().to(query.device))
            residual = br.global_residual(query, references)
            if self.adapters is not None and self.adapters.res_vis_global_adapter is not None:
                residual = self.adapters.res_vis_global_adapter(residual)
            out["residual"] = br.global_alignment_score(residual, r_res)
        return out

    @staticmethod
    def _check_dim(tokens: Tensor, direction: Tensor, layer: int) -> None:
        if tokens.shape[-1] != direction.shape[-1]:
            raise MethodError(
                f"res2clip: layer {layer} tokens have dimension {tokens.shape[-1]} but the text residual has "
                f"{direction.shape[-1]}; the text/residual branches need projected (CLIP-space) tokens"
            )

    # ---------------------------------------------------------------- training and checkpoints
    def fit(self, data: Sequence[CategoryTrainData], log: LogFn | None = None) -> None:
        if not self.trainable:
            return  # training-free: nothing to fit
        from residual_core.methods.res2clip.training import train_adapters

        train_adapters(self, data, log)

    def planned_steps(self, data: Sequence[CategoryTrainData]) -> int:
        if not self.trainable:
            return 0
        from residual_core.methods.res2clip.training import PairSampler

        train = self.config.train
        return len(PairSampler(data, train.batch_size, torch.Generator())) * train.epochs

    def _checkpoint_header(self) -> dict:
        header = {
            "config": self.config.to_dict(),
            "plan": self.plan.to_dict(),
            "dims": self.dims,
            "backbone": ckpt.backbone_identity_dict(self.backbone),
            "training_datasets": self.training_datasets,
        }
        return json.loads(json.dumps(header))

    def save_checkpoint(self, directory: str | Path) -> None:
        if self.adapters is None:
            raise MethodError("res2clip: training-free mode has no adapters to save (use mode='finetune')")
        ckpt.write_checkpoint(directory, self._checkpoint_header(), self.adapters.state_dict())

    def load_checkpoint(self, directory: str | Path) -> None:
        if self.adapters is None:
            raise MethodError(
                "res2clip: a training-free method cannot load adapters; build it with mode='finetune' "
                "or use Res2Clip.from_checkpoint"
            )
        saved = ckpt.read_header(directory)
        problems = ckpt.header_mismatches(saved, self._checkpoint_header())
        state = ckpt.read_weights(directory)
        problems += ckpt.check_state(state, self.adapters.state_dict())
        if problems:
            raise MethodError(f"res2clip checkpoint {str(directory)!r} does not fit: " + "; ".join(problems))
        self.adapters.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        self.training_datasets = list(saved.get("training_datasets", []))

    def load_authors_checkpoint(self, path: str | Path) -> None:
        """Load the authors' released `checkpoint_ep*.pth` adapters (strict key and shape check)."""
        if self.adapters is None:
            raise MethodError("res2clip: load the authors' adapters into a mode='finetune' method")
        state = ckpt.import_authors_state(path)
        problems = ckpt.check_state(state, self.adapters.state_dict())
        if problems:
            raise MethodError(f"authors' checkpoint {str(path)!r} does not fit: " + "; ".join(problems))
        self.adapters.load_state_dict(state)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, backbone, **overrides) -> Res2Clip:
        """A fine-tuned method configured from the checkpoint header (`overrides` replace fields)."""
        config = Res2ClipConfig.from_dict(ckpt.read_header(directory)["config"])
        method = cls(backbone, replace(config, **overrides) if overrides else config)
        method.load_checkpoint(directory)
        return method
