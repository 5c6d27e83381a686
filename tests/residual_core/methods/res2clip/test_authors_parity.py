"""Numerical parity with the authors' own functions (read from the local mirror; skipped without it).

The glue of their `test.py` / `train.py` (loops over layers, fusion, image score, loss sums) is
re-stated here line by line around their real `get_visual_match`, adapters, losses and Gaussian
kernel, and compared with this package's batched implementation.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from residual_core.methods import create_method
from residual_core.methods.res2clip import losses, scoring
from residual_core.methods.res2clip.adapters import MultiScaleConvAdapter, ResidualAdapter
from residual_core.methods.res2clip.prompts import compute_text_residuals
from residual_core.methods.res2clip.training import PairBatch, batch_losses, cosine_with_warmup

from .authors_code import authors_definitions, authors_module
from .helpers import make_bank, synthetic_category, textured_images


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authors")
    namespace = authors_definitions(
        "utils/metrics.py", {"get_gaussian_kernel"}, {"torch": torch, "math": math}
    )
    authors_definitions("utils/utils.py", {"get_cosine_schedule_with_warmup"}, namespace)
    namespace["adapter"] = authors_module("models/adapter.py", tmp)
    namespace["loss"] = authors_module("utils/loss.py", tmp)
    namespace["knn"] = authors_module("models/knn.py", tmp)
    return namespace


def _randomise_adapters(method, seed=0):
    torch.manual_seed(seed)
    for name, parameter in method.adapters.named_parameters():
        if name.endswith(("up.weight", "fc2.weight")):
            torch.nn.init.normal_(parameter, std=0.1)


def test_adapters_match_theirs(authors):
    torch.manual_seed(0)
    ours_vec, ours_conv = ResidualAdapter(32), MultiScaleConvAdapter(32)
    for module in (ours_vec, ours_conv):
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.2)
    theirs_vec = authors["adapter"].ResidualAdapter(embed_dim=32)
    theirs_conv = authors["adapter"].MultiScaleConvAdapter(embed_dim=32)
    theirs_vec.load_state_dict(ours_vec.state_dict())  # same parameter names
    theirs_conv.load_state_dict(ours_conv.state_dict())
    vectors, tokens = torch.randn(3, 32), torch.randn(2, 25, 32)
    torch.testing.assert_close(ours_vec(vectors), theirs_vec(vectors))
    torch.testing.assert_close(ours_conv(tokens, (5, 5)), theirs_conv(tokens))


def test_losses_match_theirs(authors):
    torch.manual_seed(0)
    loss = authors["loss"]
    scores, base, adapted = torch.randn(3, 16), torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    masks = (torch.rand(3, 1, 24, 24) > 0.7).float()
    grid = (4, 4)
    torch.testing.assert_close(
        losses.fixed_margin_ranking(scores, grid, masks, 0.7),
        loss.loss_fixed_margin_ranking(scores, masks, margin=0.7),
    )
    torch.testing.assert_close(
        losses.dynamic_margin_ranking(scores, base, grid, masks, 0.6),
        loss.loss_dynamic_margin_ranking(scores, base, masks, tau=0.6),
    )
    torch.testing.assert_close(
        losses.magnitude_control(adapted, base, grid, masks),
        sum(loss.loss_magnitude_control(adapted, base, masks)),
    )
    g_scores, g_base, labels = torch.randn(5), torch.randn(5, 8), torch.tensor([0.0, 1, 1, 0, 1])
    torch.testing.assert_close(
        losses.fixed_margin_ranking_global(g_scores, labels, 0.4),
        loss.loss_fixed_margin_ranking_global(g_scores, labels, margin=0.4),
    )
    torch.testing.assert_close(
        losses.dynamic_margin_ranking_global(g_scores, g_base, labels, 1.0),
        loss.loss_dynamic_margin_ranking_global(g_scores, g_base, labels, tau=1.0),
    )


def test_gaussian_and_schedule_match_theirs(authors):
    theirs = authors["get_gaussian_kernel"](kernel_size=5, sigma=4)
    ours = scoring.gaussian_kernel(5, 4.0)
    torch.testing.assert_close(ours, theirs.weight[0, 0])
    maps = torch.rand(2, 30, 30)
    torch.testing.assert_close(scoring.gaussian_smooth(maps, ours), theirs(maps[:, None])[:, 0])
    factors = []
    for make in (cosine_with_warmup, authors["get_cosine_schedule_with_warmup"]):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = make(optimizer, 3, 10)
        factors.append([schedule.lr_lambdas[0](step) for step in range(12)])
    assert factors[0] == factors[1]


def test_text_residuals_match_their_text_bank():
    """Their compute_text_features with a deterministic stand-in text encoder (hash of the prompt)."""
    namespace = authors_definitions(
        "models/clip.py", {"COMMON_TEMPLATES", "encode_and_mean", "compute_text_features"}, {"torch": torch}
    )

    def encode(texts):
        # every distinct (whitespace-normalised) prompt gets its own pseudo-random direction
        rows = []
        for text in texts:
            seed = sum((i + 1) * ord(c) for i, c in enumerate(" ".join(text.split())))
            rows.append(torch.randn(16, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)

    class Model:
        def encode_text(self, prompts):
            return encode(prompts)

    namespace["tokenize"] = lambda prompts: _Prompts(prompts)
    theirs = namespace["compute_text_features"](Model(), "cpu")
    ours = compute_text_residuals(encode)
    for mine, their in zip(
        (ours.neutral, ours.normal, ours.anomalous, ours.normal_residual, ours.anomaly), theirs, strict=True
    ):
        torch.testing.assert_close(mine, their)


class _Prompts(list):
    def to(self, device):
        return self


def _their_test_py(authors, method, features, bank, image_size, mode):
    """test.py's per-image computation (B = 1 each), re-stated around their functions."""
    knn, kernel = authors["knn"], authors["get_gaussian_kernel"](kernel_size=5, sigma=4)
    plan, layers = method.plan, method.backbone_layers
    adapters = method.adapters
    r_t = method.text_residuals().anomaly
    if mode == "finetune":
        r_res = adapters.res_text_adapter(r_t)
        r_res = r_res / r_res.norm(dim=-1, keepdim=True)
        r_text = adapters.text_adapter(r_t)
        r_text = r_text / r_text.norm(dim=-1, keepdim=True)
    else:
        r_res = r_text = r_t
    k_shot = bank.header.k_shot
    maps_out, scores_out = [], []
    for b in range(features.patch_tokens[0].shape[0]):
        maps_text, maps_vis, maps_res = [], [], []
        for layer in plan.used_layers:
            i = layers.index(layer)
            feat = features.patch_tokens[i][b : b + 1]
            feat = feat / feat.norm(dim=-1, keepdim=True)
            _, length, _ = feat.shape
            side = int(length**0.5)
            if layer in plan.text_layers:
                maps_text.append((feat @ r_text.unsqueeze(-1)).squeeze(-1).view(1, 1, side, side))
            ref = bank.features[bank.header.layers.index(layer)]
            ref = (ref / ref.norm(dim=-1, keepdim=True))[None]
            _, matched = knn.get_visual_match(
                feat=feat,
                ref_feat=ref,
                strategy="sparse_radial_knn",
                spatial_penalty=0.01,
                k_shot=k_shot,
                device="cpu",
            )
            r_v = feat - matched
            if layer in plan.visual_layers:
                vis = adapters.vis_adapters[str(layer)](r_v, (side, side)) if mode == "finetune" else r_v
                maps_vis.append(torch.norm(vis, p=2, dim=-1).view(1, 1, side, side))
            if layer in plan.residual_layers:
                res = (
                    adapters.res_vis_local_adapters[str(layer)](r_v, (side, side))
                    if mode == "finetune"
                    else r_v
                )
                maps_res.append(
                    torch.clamp((res @ r_res.unsqueeze(-1)).squeeze(-1), min=0).view(1, 1, side, side)
                )

        def avg_upsample(maps):
            m = torch.stack(maps, dim=0).mean(dim=0)
            return kernel(F.interpolate(m, size=(image_size, image_size), mode="bilinear"))

        m_text, m_vis, m_res = avg_upsample(maps_text), avg_upsample(maps_vis), avg_upsample(maps_res)
        fused = m_text * 0.1 + m_vis + m_res * (0.1 if mode == "finetune" else 1.0)
        fused = kernel(F.interpolate(fused, size=(image_size, image_size), mode="bilinear"))

        def top1pct(m):
            flat = m.flatten(1)
            k = max(1, int(flat.shape[1] * 0.01))
            return torch.sort(flat, dim=1, descending=True)[0][:, :k].mean(dim=1).unsqueeze(1)

        g = features.global_embedding[b : b + 1]
        g = g / g.norm(dim=-1, keepdim=True)
        s_text_cls = (g.unsqueeze(1) @ r_text.unsqueeze(-1)).squeeze(-1).squeeze(-1).unsqueeze(1)
        ref_g = bank.global_embeddings / bank.global_embeddings.norm(dim=-1, keepdim=True)
        ref_mean = ref_g[None].mean(dim=1, keepdim=True)
        ref_mean = ref_mean / ref_mean.norm(dim=-1, keepdim=True)
        r_v_cls = g.unsqueeze(1) - ref_mean
        if mode == "finetune":
            r_v_cls = adapters.res_vis_global_adapter(r_v_cls)
        s_res_cls = torch.clamp((r_v_cls @ r_res.unsqueeze(-1)).squeeze(-1).squeeze(-1), min=0).unsqueeze(1)
        s_text = 0.5 * top1pct(m_text) + 0.5 * s_text_cls
        s_vis = top1pct(m_vis)
        s_res = 0.5 * top1pct(m_res) + 0.5 * s_res_cls
        score = s_text + s_vis + s_res * (0.1 if mode == "finetune" else 1.0)
        maps_out.append(fused[:, 0])
        scores_out.append(score[:, 0])
    return torch.cat(maps_out), torch.cat(scores_out)


@pytest.mark.parametrize("mode", ["training-free", "finetune"])
def test_scoring_matches_their_test_py(authors, clip_backbone, mode):
    method = create_method("res2clip", clip_backbone, mode=mode)
    if mode == "finetune":
        _randomise_adapters(method)
    bank = make_bank(clip_backbone, textured_images(2, 64, seed=7))
    queries = textured_images(3, 64, seed=8)
    queries[1, :, 10:30, 10:30] += 2.0
    with torch.no_grad():
        features = clip_backbone.forward_features(queries)
        ours = method.score_features(features, bank, 64)
        their_map, their_score = _their_test_py(authors, method, features, bank, 64, mode)
    torch.testing.assert_close(ours.anomaly_map, their_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.image_score, their_score, atol=1e-5, rtol=1e-4)


def _their_train_step_losses(authors, method, batch, train_res_vis, tau=1.0):
    """The loss sums of one train.py step (B pairs), re-stated around their functions."""
    loss, knn = authors["loss"], authors["knn"]
    adapters, plan, layers = method.adapters, method.plan, method.backbone_layers
    size = batch.queries.shape[0]
    gt_mask = batch.masks
    feats = method.backbone.forward_features(torch.cat([batch.queries, batch.references]))
    g = feats.global_embedding
    g_q, g_ref = (
        g[:size] / g[:size].norm(dim=-1, keepdim=True),
        g[size:] / g[size:].norm(dim=-1, keepdim=True),
    )
    r_t = method.text_residuals().anomaly.unsqueeze(0).expand(size, -1)
    r_text = adapters.text_adapter(r_t)
    r_text = r_text / r_text.norm(dim=-1, keepdim=True)
    r_res = adapters.res_text_adapter(r_t)
    r_res = r_res / r_res.norm(dim=-1, keepdim=True)
    label = gt_mask.view(size, -1).max(dim=-1)[0]
    l_vis = l_res_vis = l_res_text = 0.0
    l_text = loss.loss_fixed_margin_ranking_global((g_q * r_text).sum(dim=-1), label, margin=tau)
    l_text = l_text + (1.0 - F.cosine_similarity(r_text, r_t, dim=-1)).mean()
    r_v_cls = g_q - g_ref
    r_v_cls_res = adapters.res_vis_global_adapter(r_v_cls)
    s_res_cls = (r_v_cls_res * r_res).sum(dim=-1)
    if train_res_vis:
        l_res_vis = loss.loss_dynamic_margin_ranking_global(s_res_cls, r_v_cls, label, tau=tau)
        l_res_vis = l_res_vis + F.l1_loss(r_v_cls_res.norm(dim=-1), r_v_cls.norm(dim=-1))
    else:
        l_res_text = loss.loss_dynamic_margin_ranking_global(s_res_cls, r_v_cls, label, tau=tau)
        l_res_text = l_res_text + (1.0 - F.cosine_similarity(r_res, r_t, dim=-1)).mean()
    for layer in plan.used_layers:
        i = layers.index(layer)
        f_q, f_ref = feats.patch_tokens[i][:size], feats.patch_tokens[i][size:]
        f_q, f_ref = f_q / f_q.norm(dim=-1, keepdim=True), f_ref / f_ref.norm(dim=-1, keepdim=True)
        side = int(f_q.shape[1] ** 0.5)
        matched = torch.stack(
            [
                knn.get_visual_match(
                    feat=f_q[b : b + 1],
                    ref_feat=f_ref[b : b + 1],
                    strategy="sparse_radial_knn",
                    spatial_penalty=0.01,
                    k_shot=1,
                    device="cpu",
                )[1].squeeze(0)
                for b in range(size)
            ]
        )
        r_v = f_q - matched
        if layer in plan.visual_layers:
            l_vis = l_vis + sum(
                loss.loss_magnitude_control(
                    adapters.vis_adapters[str(layer)](r_v, (side, side)), r_v, gt_mask
                )
            )
        if layer in plan.text_layers:
            s_text = (f_q @ r_text.unsqueeze(-1)).squeeze(-1)
            l_text = l_text + loss.loss_fixed_margin_ranking(s_text, gt_mask, margin=tau)
        if layer in plan.residual_layers:
            r_v_res = adapters.res_vis_local_adapters[str(layer)](r_v, (side, side))
            s_res = (r_v_res @ r_res.unsqueeze(-1)).squeeze(-1)
            ranking = loss.loss_dynamic_margin_ranking(s_res, r_v, gt_mask, tau=tau)
            if train_res_vis:
                l_res_vis = l_res_vis + ranking + F.l1_loss(r_v_res.norm(dim=-1), r_v.norm(dim=-1))
            else:
                l_res_text = l_res_text + ranking
    return {"visual": l_vis, "text": l_text, "residual_visual": l_res_vis, "residual_text": l_res_text}


@pytest.mark.parametrize("train_res_vis", [True, False])
def test_training_losses_match_their_train_py(authors, clip_backbone, train_res_vis):
    method = create_method("res2clip", clip_backbone, mode="finetune")
    _randomise_adapters(method, seed=1)
    data = synthetic_category("widget", 64, count=4, seed=2)
    batch = PairBatch(
        data.images,
        data.references[:1].expand(4, -1, -1, -1),
        data.labels.float(),
        data.masks,
        torch.ones(4, dtype=torch.bool),
    )
    with torch.no_grad():
        ours = batch_losses(method, batch, train_res_vis)
        theirs = _their_train_step_losses(authors, method, batch, train_res_vis)
    for name, value in theirs.items():
        torch.testing.assert_close(
            ours[name], torch.as_tensor(value, dtype=torch.float32), atol=1e-5, rtol=1e-4
        )
