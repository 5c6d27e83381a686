"""open_clip ViT backbones with the patch-token path of the Res2CLIP authors (AnomalyCLIP's DPAM).

Re-implements the visual forward over open_clip's own modules (conv1, ln_pre, resblocks, ln_post, proj):
- positional embeddings bilinearly interpolated to the input grid (clip_lib/AnomalyCLIP.py
  VisionTransformer.forward);
- DPAM (`DAPM_replace(DPAM_layer)` + `Transformer.AnomalyCLIP_forward`): the last `dpam_layer - 1`
  blocks get a second, v-v attention path. The original path runs each block unchanged; the v-v path
  starts from the residual stream entering the first replaced block and adds, per replaced block,
  out_proj(softmax(v v^T / sqrt(d_head)) v) with v computed from ln_1 of the *original* path; it skips
  the MLP. Taps of replaced layers return the v-v path, earlier taps the plain stream;
- patch tokens of each chosen layer: ln_post then @ proj, CLS dropped (test.py: `feat[:, 1:, :]`);
- global embedding: CLS of the original path @ proj *without* ln_post, as the authors' code returns it
  (`x_ori[0, :, :] @ self.proj`); `global_ln_post=True` gives open_clip's usual image embedding.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from torch import Tensor, nn

from residual_core.backbones.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Backbone,
    BackboneError,
    BackboneFeatures,
    BackboneIdentity,
    check_layers,
    identity_name,
)
from residual_core.backbones.checkpoints import Opener, load_checked, read_weights

# The authors call encode_image(..., DPAM_layer=20) on 24-block ViT-L/14-336 (test.py).
AUTHORS_DPAM_LAYER = 20
AUTHORS_NUM_BLOCKS = 24

# Architectures known to residual-ad on top of open_clip's own registry (built in-process, so that
# Ray workers can create them without a registration step).
EXTRA_OPENCLIP_CONFIGS: dict[str, dict[str, Any]] = {
    # A tiny random ViT for tests: 4 blocks, width 64, patch 16 at 64 px, text width 64 x 2 blocks.
    "ResidualAD-Tiny-ViT-16": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}


def register_openclip_config(name: str, config: dict[str, Any]) -> None:
    """Make an extra open_clip architecture (open_clip JSON config layout) nameable in specs."""
    if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise BackboneError(f"open_clip config {name!r} needs embed_dim, vision_cfg and text_cfg")
    EXTRA_OPENCLIP_CONFIGS[name] = copy.deepcopy(config)


@dataclass(frozen=True)
class OpenClipOptions:
    """Options of the openclip: kind (keyword arguments of create_backbone)."""

    dpam_layer: int | None = None  # authors' DPAM_layer: replaces the last dpam_layer-1 blocks;
    # None -> 20 for 24 blocks, scaled for other depths; 1 (or 0) -> no DPAM
    global_ln_post: bool = False  # False reproduces the authors' global embedding (no ln_post)


def default_dpam_layer(num_blocks: int) -> int:
    """The authors' DPAM_layer=20 for 24 blocks, scaled to other depths (12 -> 10, 4 -> 3)."""
    return max(1, round(AUTHORS_DPAM_LAYER * num_blocks / AUTHORS_NUM_BLOCKS))


def default_clip_layers(num_blocks: int) -> tuple[int, ...]:
    """6/12/18/24 for 24 blocks; the same quarters of the depth for other models (12 -> 3/6/9/12)."""
    return tuple(sorted({max(1, round(num_blocks * q / 4)) for q in (1, 2, 3, 4)}))


class OpenClipBackbone(Backbone):
    """A frozen open_clip CLIP model exposing the authors' DPAM patch tokens and its text tower."""

    has_text = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        identity: BackboneIdentity,
        options: OpenClipOptions,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__(identity, mean, std)
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        visual = model.visual
        num_blocks = len(visual.transformer.resblocks)
        dpam_layer = options.dpam_layer if options.dpam_layer is not None else default_dpam_layer(num_blocks)
        self.dpam_layer = dpam_layer
        # DAPM_replace: for i in range(1, DPAM_layer): resblocks[-i] -> blocks n-dpam_layer+1 .. n-1 (0-based)
        self.first_dpam_block = num_blocks - max(dpam_layer - 1, 0)
        self.patch_size = int(visual.patch_size[0])
        self.freeze()

    @property
    def visual(self) -> OpenClipVisionTransformer:
        return self.model.visual

    def forward_features(self, images: Tensor) -> BackboneFeatures:
        self.check_images(images)
        visual = self.visual
        tokens, grid = self._embed(images.to(visual.conv1.weight.dtype))
        wanted = set(self.layers)
        taps: dict[int, Tensor] = {}
        vv_path: Tensor | None = None
        for index, block in enumerate(visual.transformer.resblocks):
            if index >= self.first_dpam_block:
                if vv_path is None:
                    vv_path = tokens
                vv_path = vv_path + block.ls_1(_vv_attention(block, block.ln_1(tokens)))
            tokens = self._run_block(block, tokens)
            if index + 1 in wanted:
                taps[index + 1] = vv_path if vv_path is not None else tokens
        patch_tokens = [visual.ln_post(taps[layer][:, 1:]) @ visual.proj for layer in self.layers]
        cls_token = tokens[:, 0]
        if self.options.global_ln_post:
            cls_token = visual.ln_post(cls_token)
        global_embedding = cls_token @ visual.proj
        return BackboneFeatures(
            patch_tokens=patch_tokens, grids=[grid] * len(patch_tokens), global_embedding=global_embedding
        )

    def encode_text(self, texts: list[str]) -> Tensor:
        """[T, E] text embeddings (not normalised), tokenised with the model's open_clip tokenizer."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise BackboneError("encode_text expects a non-empty list of strings")
        token_ids = self.tokenizer(list(texts)).to(self.visual.conv1.weight.device)
        return self.model.encode_text(token_ids)

    def _embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        visual = self.visual
        patches = visual.conv1(images)  # [B, C, gh, gw]
        batch, width, grid_h, grid_w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls_token = visual.class_embedding.to(patches.dtype).view(1, 1, width).expand(batch, 1, width)
        tokens = torch.cat([cls_token, patches], dim=1)
        tokens = tokens + self._positional_embedding(grid_h, grid_w).to(tokens.dtype)
        tokens = visual.patch_dropout(tokens)  # identity in eval mode
        return visual.ln_pre(tokens), (grid_h, grid_w)

    def _positional_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """CLS position kept; grid positions bilinearly resized (align_corners=False) like the authors."""
        pos = self.visual.positional_embedding
        side = round((pos.shape[0] - 1) ** 0.5)
        if (grid_h, grid_w) == (side, side):
            return pos
        width = pos.shape[1]
        grid = pos[1:].reshape(1, side, side, width).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, width).to(pos.dtype)
        return torch.cat([pos[:1], grid], dim=0)

    def _run_block(self, block: nn.Module, tokens: Tensor) -> Tensor:
        if self.visual.transformer.batch_first:
            return block(tokens)
        return block(tokens.transpose(0, 1)).transpose(0, 1)


def _vv_attention(block: ResidualAttentionBlock, normed: Tensor) -> Tensor:
    """out_proj(softmax(v v^T * d_head^-0.5) v) with the block's own value projection; [B, L, C]."""
    attn = block.attn
    batch, length, width = normed.shape
    heads = attn.num_heads
    value = F.linear(normed, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    value = value.view(batch, length, heads, width // heads).transpose(1, 2)
    mixed = F.scaled_dot_product_attention(value, value, value)
    mixed = mixed.transpose(1, 2).reshape(batch, length, width)
    return F.linear(mixed, attn.out_proj.weight, attn.out_proj.bias)


def _check_supported(model: nn.Module, arch: str) -> None:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, OpenClipVisionTransformer):
        raise BackboneError(
            f"openclip:{arch}: only ViT image towers are supported (got {type(visual).__name__})"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.proj is None:
        raise BackboneError(
            f"openclip:{arch}: needs CLS-token pooling, no attentional pool, and a projection"
        )
    for index, block in enumerate(visual.transformer.resblocks):
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise BackboneError(
                f"openclip:{arch}: block {index} is {type(block).__name__}, not a plain block"
            )
        if not isinstance(block.attn, nn.MultiheadAttention) or block.attn.in_proj_weight is None:
            raise BackboneError(f"openclip:{arch}: block {index} lacks a packed q/k/v projection")


def _adapt_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The format fixes open_clip applies to CLIP checkpoints (OpenAI extras, old text layout)."""
    state_dict = {
        k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")
    }
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        from open_clip.model import convert_to_custom_text_state_dict

        state_dict = convert_to_custom_text_state_dict(state_dict)
    scale = state_dict.get("logit_scale")
    if scale is not None and hasattr(model, "logit_scale") and scale.ndim != model.logit_scale.ndim:
        state_dict["logit_scale"] = scale.reshape(model.logit_scale.shape)
    return state_dict


def _state_sha256(model: nn.Module) -> str:
    """Hash of a state dict's names, shapes and bytes (for weights that arrive without a file)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _simple_tokenizer(context_length: int) -> Any:
    return open_clip.SimpleTokenizer(context_length=context_length)


def _create_model(arch: str) -> tuple[nn.Module, Any]:
    if arch in EXTRA_OPENCLIP_CONFIGS:
        config = copy.deepcopy(EXTRA_OPENCLIP_CONFIGS[arch])
        model = open_clip.CLIP(**config)
        return model, _simple_tokenizer(int(config["text_cfg"].get("context_length", 77)))
    if arch not in open_clip.list_models():
        raise BackboneError(
            f"openclip:{arch}: unknown architecture (not in open_clip.list_models() "
            f"nor {sorted(EXTRA_OPENCLIP_CONFIGS)})"
        )
    return open_clip.create_model(arch, pretrained=None), open_clip.get_tokenizer(arch)


def build_openclip(
    spec: str,
    arch: str,
    weights: str | None,
    *,
    layers: tuple[int, ...] | None,
    image_size: int | None,
    device: str | torch.device,
    opener: Opener | None,
    options: dict[str, Any],
) -> OpenClipBackbone:
    """Builder of `openclip:<arch>[@<checkpoint-url-or-pretrained-tag>]`."""
    try:
        clip_options = OpenClipOptions(**options)
    except TypeError as error:
        raise BackboneError(
            f"{spec}: unknown option(s) {sorted(options)}; known: dpam_layer, global_ln_post"
        ) from error
    if (
        weights
        and arch not in EXTRA_OPENCLIP_CONFIGS
        and weights in open_clip.list_pretrained_tags_by_model(arch)
    ):
        model = open_clip.create_model(arch, pretrained=weights)  # pretrained tag: open_clip downloads it
        tokenizer = open_clip.get_tokenizer(arch)
        weights_sha256 = _state_sha256(model)
    else:
        loaded = read_weights(weights, opener) if weights else None  # fail fast, before building
        model, tokenizer = _create_model(arch)
        weights_sha256 = ""
        if loaded is not None:
            load_checked(model, _adapt_state_dict(model, loaded.state_dict), source=weights)
            weights_sha256 = loaded.sha256
    _check_supported(model, arch)
    visual = model.visual
    num_blocks = len(visual.transformer.resblocks)
    chosen = check_layers(layers or default_clip_layers(num_blocks), range(1, num_blocks + 1), spec)
    size = int(image_size or visual.image_size[0])
    patch = int(visual.patch_size[0])
    if size <= 0 or size % patch:
        raise BackboneError(
            f"{spec}: image_size {size} must be a positive multiple of the patch size {patch}"
        )
    if clip_options.dpam_layer is not None and not 0 <= clip_options.dpam_layer <= num_blocks + 1:
        raise BackboneError(f"{spec}: dpam_layer {clip_options.dpam_layer} outside [0, {num_blocks + 1}]")
    extras: dict[str, Any] = {}
    if clip_options.dpam_layer is not None and clip_options.dpam_layer != default_dpam_layer(num_blocks):
        extras["dpam_layer"] = clip_options.dpam_layer
    if clip_options.global_ln_post:
        extras["global_ln_post"] = True
    identity = BackboneIdentity(
        name=identity_name(spec, extras), weights_sha256=weights_sha256, layers=chosen, image_size=size
    )
    preprocess = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(preprocess.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(preprocess.get("std", OPENAI_CLIP_STD))
    backbone = OpenClipBackbone(model.float(), tokenizer, identity, clip_options, mean, std)
    return backbone.to(device)
