"""Fine-tuning of the Res2CLIP adapters: the authors' alternating schedule (`train.py`).

Every step takes a batch of (query, reference) pairs: a query image of an auxiliary category
(normal or anomalous) with a random normal image of the same category. The frozen backbone
encodes both; then
  - the visual adapters A_{v,l} learn magnitude control (every epoch),
  - the text adapter A_t learns fixed-margin ranking of <f_q, R~_t> (every epoch),
  - the residual branch alternates: even epochs (0, 2, ...) train the visual-residual adapters
    A^res_{v,l}, A^res_{v,cls} against a frozen R~^res_t; odd epochs train A^res_t against frozen
    visual-residual adapters; both with dynamic-margin ranking and their regularisers.
Four Adam optimisers (betas 0.5, 0.999), cosine schedules with a one-epoch linear warm-up, gradient
clipping at 1.0, one backward per loss group, as in the authors' loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from residual_core.matching import match_per_sample
from residual_core.methods.base import CategoryTrainData, LogFn, MethodError
from residual_core.methods.res2clip import losses
from residual_core.methods.res2clip.branches import unit


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The authors' `get_cosine_schedule_with_warmup`: linear 0 -> 1 over warm-up, then half cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class PairBatch:
    queries: Tensor  # [B, 3, S, S]
    references: Tensor  # [B, 3, S, S] normal image of the same category
    labels: Tensor  # [B] float 0/1
    masks: Tensor  # [B, 1, S, S] float {0, 1} (zeros where unknown)
    pixel_valid: Tensor  # [B] bool: the mask is known (normal image, or anomalous with a mask)


def check_train_data(data: Sequence[CategoryTrainData]) -> None:
    """Clear errors for unusable training data, naming the category and the reason."""
    if not data:
        raise MethodError("res2clip: fit() needs at least one auxiliary category")
    for item in data:
        item.check_shapes("res2clip")
        if item.images.shape[0] > 0 and item.references.shape[0] + int((item.labels == 0).sum()) == 0:
            raise MethodError(f"res2clip training data {item.name}: no normal image to pair queries with")


class PairSampler:
    """Shuffled batches of (query, random normal reference of the same category) (their RefDataset)."""

    def __init__(self, data: Sequence[CategoryTrainData], batch_size: int, generator: torch.Generator):
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.samples = [(c, i) for c, item in enumerate(data) for i in range(item.images.shape[0])]
        if not self.samples:
            raise MethodError("res2clip: the training data holds no images")
        # normal pool per category: the references, then the normal query images
        self.normal_images = [(item.labels == 0).nonzero().flatten() for item in data]

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def _reference(self, category: int, index: int) -> Tensor:
        item = self.data[category]
        pool_refs, pool_imgs = item.references.shape[0], self.normal_images[category]
        pool_imgs = pool_imgs[pool_imgs != index]  # never the query itself
        if pool_refs + pool_imgs.numel() == 0:
            return item.images[index]  # their fallback: a lone normal image is its own reference
        choice = int(torch.randint(pool_refs + pool_imgs.numel(), (1,), generator=self.generator))
        return item.references[choice] if choice < pool_refs else item.images[pool_imgs[choice - pool_refs]]

    def epoch(self, device) -> Iterator[PairBatch]:
        order = torch.randperm(len(self.samples), generator=self.generator).tolist()
        for start in range(0, len(order), self.batch_size):
            chosen = [self.samples[k] for k in order[start : start + self.batch_size]]
            queries, references, labels, masks, valid = [], [], [], [], []
            for category, index in chosen:
                item = self.data[category]
                label = float(item.labels[index])
                has_mask = bool(item.has_mask[index]) and item.masks is not None
                queries.append(item.images[index])
                references.append(self._reference(category, index))
                labels.append(label)
                mask = item.masks[index] if has_mask else torch.zeros(1, *item.images.shape[-2:])
                masks.append((mask.float() > 0.5).float())
                valid.append(has_mask or label == 0)
            yield PairBatch(
                torch.stack(queries).to(device),
                torch.stack(references).to(device),
                torch.tensor(labels, device=device),
                torch.stack(masks).to(device),
                torch.tensor(valid, device=device),
            )


def _params(*modules: nn.Module | None) -> list[nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters()]


def _set_trainable(modules, flag: bool) -> None:
    for module in modules:
        if module is not None:
            module.train(flag)
            for p in module.parameters():
                p.requires_grad_(flag)


class _Group:
    """One optimiser + schedule over some adapters (their opt_vis / opt_res_vis / opt_res_text / opt_text)."""

    def __init__(self, params, lr, betas, warmup, total, clip):
        self.params, self.clip = params, clip
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=betas) if params else None
        self.schedule = cosine_with_warmup(self.optimizer, warmup, total) if params else None

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad()

    def step(self, loss: Tensor) -> None:
        if self.optimizer is None or not loss.requires_grad:
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.schedule.step()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0


def train_adapters(method, data: Sequence[CategoryTrainData], log: LogFn | None = None) -> None:
    """Run the authors' fine-tuning loop on `method.adapters` (in place)."""
    check_train_data(data)
    cfg, adapters = method.config.train, method.adapters
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = PairSampler(data, cfg.batch_size, generator)
    steps, epochs = len(sampler), cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps))
    res_visual = [adapters.res_vis_local_adapters, adapters.res_vis_global_adapter]
    groups = {
        "visual": _Group(
            _params(adapters.vis_adapters), cfg.lr_visual, cfg.betas, warmup, steps * epochs, cfg.grad_clip
        ),
        "residual_visual": _Group(
            _params(*res_visual),
            cfg.lr_visual,
            cfg.betas,
            warmup,
            steps * math.ceil(epochs / 2.0),
            cfg.grad_clip,
        ),
        "residual_text": _Group(
            _params(adapters.res_text_adapter),
            cfg.lr_text,
            cfg.betas,
            warmup,
            steps * max(1, epochs // 2),
            cfg.grad_clip,
        ),
        "text": _Group(
            _params(adapters.text_adapter), cfg.lr_text, cfg.betas, warmup, steps * epochs, cfg.grad_clip
        ),
    }
    method.train()
    step = 0
    for epoch in range(epochs):
        train_res_visual = epoch % 2 == 0
        _set_trainable([adapters.vis_adapters, adapters.text_adapter], True)
        _set_trainable(res_visual, train_res_visual)
        _set_trainable([adapters.res_text_adapter], not train_res_visual)
        residual_group = "residual_visual" if train_res_visual else "residual_text"
        for batch in sampler.epoch(method.device):
            for group in groups.values():
                group.zero_grad()
            loss = batch_losses(method, batch, train_res_visual)
            for name in ("visual", "text", residual_group):
                groups[name].step(loss[name])
            step += 1
            if log is not None:
                metrics = {
                    f"loss_{name}": float(value.detach())
                    for name, value in loss.items()
                    if name in ("visual", "text", residual_group)
                }
                metrics.update({f"lr_{name}": group.lr() for name, group in groups.items()})
                metrics["epoch"] = float(epoch)
                log(step, metrics)
    method.eval()
    _set_trainable([adapters], False)
    method.training_datasets = [
        {"dataset": item.dataset, "category": item.category, "images": int(item.images.shape[0])}
        for item in data
    ]


def batch_losses(method, batch: PairBatch, train_res_visual: bool) -> dict[str, Tensor]:
    """The four loss groups of one step (train.py inner loop); absent branches give a zero loss."""
    plan, adapters, tau = method.plan, method.adapters, method.config.train.tau
    device = batch.queries.device
    zero = torch.zeros((), device=device)
    loss = {"visual": zero, "text": zero, "residual_visual": zero, "residual_text": zero}
    size = batch.queries.shape[0]
    with torch.no_grad():
        features = method.backbone.forward_features(torch.cat([batch.queries, batch.references]))
    run_text, run_residual = "text" in plan.branches, "residual" in plan.branches
    labels, masks, valid = batch.labels, batch.masks, batch.pixel_valid

    r_text = r_res = None
    if run_text or run_residual:
        if features.global_embedding is None:
            raise MethodError("res2clip: training the text/residual branches needs global embeddings")
        g = unit(features.global_embedding.float())
        g_query, g_ref = g[:size], g[size:]
        r_t = method.text_residuals().anomaly.unsqueeze(0).expand(size, -1)
    if run_text:
        r_text = unit(adapters.text_adapter(r_t))
        s_text_global = (g_query * r_text).sum(dim=-1)
        loss["text"] = losses.fixed_margin_ranking_global(s_text_global, labels, tau)
        loss["text"] = loss["text"] + losses.direction_regulariser(r_text, r_t)
    if run_residual:
        with torch.set_grad_enabled(not train_res_visual):
            r_res = unit(adapters.res_text_adapter(r_t))
        r_global = g_query - g_ref
        with torch.set_grad_enabled(train_res_visual):
            r_global_adapted = adapters.res_vis_global_adapter(r_global)
        s_res_global = (r_global_adapted * r_res).sum(dim=-1)
        ranking = losses.dynamic_margin_ranking_global(s_res_global, r_global, labels, tau)
        if train_res_visual:
            regulariser = losses.magnitude_regulariser(r_global_adapted, r_global)
            loss["residual_visual"] = ranking + regulariser
        else:
            loss["residual_text"] = ranking + losses.direction_regulariser(r_res, r_t)

    for layer in plan.used_layers:
        position = method.backbone_layers.index(layer)
        tokens = unit(features.patch_tokens[position].float())
        grid = tuple(features.grids[position])
        f_query, f_ref = tokens[:size], tokens[size:]
        if run_text and layer in plan.text_layers:
            s_text = torch.einsum("bld,bd->bl", f_query, r_text)
            loss["text"] = loss["text"] + losses.fixed_margin_ranking(s_text, grid, masks, tau, valid)
        on_visual = "visual" in plan.branches and layer in plan.visual_layers
        on_residual = run_residual and layer in plan.residual_layers
        if not (on_visual or on_residual):
            continue
        with torch.no_grad():
            matched = match_per_sample(f_query, f_ref, method.strategy, grid=grid).matched
        residual = f_query - matched
        if on_visual:
            adapted = adapters.vis_adapters[str(layer)](residual, grid)
            loss["visual"] = loss["visual"] + losses.magnitude_control(adapted, residual, grid, masks, valid)
        if on_residual:
            with torch.set_grad_enabled(train_res_visual):
                adapted = adapters.res_vis_local_adapters[str(layer)](residual, grid)
            s_res = torch.einsum("bld,bd->bl", adapted, r_res)
            ranking = losses.dynamic_margin_ranking(s_res, residual, grid, masks, tau, valid)
            if train_res_visual:
                regulariser = losses.magnitude_regulariser(adapted, residual)
                loss["residual_visual"] = loss["residual_visual"] + ranking + regulariser
            else:
                loss["residual_text"] = loss["residual_text"] + ranking
    return loss
