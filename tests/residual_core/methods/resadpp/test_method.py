"""ResAD++ end to end on real backbones: fit, score, checkpoint round trip and compatibility errors."""

from __future__ import annotations

import json

import pytest
import torch

from residual_core.backbones import create_backbone
from residual_core.bank import build_bank
from residual_core.methods import CategoryTrainData, MethodError, available_methods, create_method
from residual_core.methods.resadpp import ResADpp

IMAGE_SIZE = 64
TINY = dict(num_embeddings=16, coupling_layers=1, pos_embed_dim=8, position_batch=100_000,
            keep_partial_position_batch=True, smoothing_sigma=1.0)


@pytest.fixture(scope="module")
def cnn_backbone():
    return create_backbone("effnet-lite0", image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def clip_backbone(tiny_openclip_checkpoint):
    return create_backbone(tiny_openclip_checkpoint.spec)


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def bank_for(backbone, size: int):
    return build_bank(backbone, images(2, size, 7), image_ids=["r0", "r1"], dataset="d", category="c", seed=0)


def train_category(size: int) -> CategoryTrainData:
    masks = torch.zeros(4, 1, size, size)
    masks[2, :, size // 4: size // 2, size // 4: size // 2] = 1
    return CategoryTrainData(
        dataset="d", category="c", references=images(2, size, 1), images=images(4, size, 2),
        labels=torch.tensor([0, 0, 1, 1]), masks=masks, has_mask=torch.tensor([False, False, True, False]),
    )


@pytest.fixture(scope="module")
def trained(cnn_backbone, tmp_path_factory):
    method = create_method("resadpp", cnn_backbone, epochs=2, first_stage_epochs=1, batch_size=4, lr=1e-3,
                           **TINY)
    logged = []
    method.fit([train_category(IMAGE_SIZE)], lambda step, metrics: logged.append((step, metrics)))
    directory = tmp_path_factory.mktemp("resadpp_ckpt")
    method.save_checkpoint(directory)
    return method, logged, directory


def test_registered():
    assert "resadpp" in available_methods()


def test_fit_runs_both_stages(trained):
    method, logged, _ = trained
    # one log per optimisation step, each with that step's loss terms, its epoch and stage
    assert [step for step, _ in logged] == list(range(1, len(logged) + 1))
    first, last = logged[0][1], logged[-1][1]
    assert (first["epoch"], first["stage"]) == (0.0, 1.0) and (last["epoch"], last["stage"]) == (1.0, 2.0)
    assert "loss_focal" in last and "loss_focal" not in first
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for _, m in logged)
    assert method.boundaries.boundaries.abs().sum() > 0


def test_score_on_cnn_backbone(trained, cnn_backbone):
    method, _, _ = trained
    out = method.score(images(3, IMAGE_SIZE, 5), bank_for(cnn_backbone, IMAGE_SIZE))
    assert out.anomaly_map.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and out.image_score.shape == (3,)
    assert set(out.branch_scores) == {"likelihood", "boundary"} and out.branches == ("likelihood", "boundary")
    assert torch.isfinite(out.anomaly_map).all()
    assert torch.allclose(out.image_score, out.anomaly_map.flatten(1).max(1).values)
    # batch composition does not change a sample's scores
    single = method.score(images(3, IMAGE_SIZE, 5)[:1], bank_for(cnn_backbone, IMAGE_SIZE))
    assert torch.allclose(single.anomaly_map[0], out.anomaly_map[0], atol=1e-5)


def test_score_on_openclip_backbone(clip_backbone):
    method = create_method("resadpp", clip_backbone, **TINY)
    size = clip_backbone.image_size
    out = method.score(images(2, size, 3), bank_for(clip_backbone, size))
    assert out.anomaly_map.shape == (2, size, size) and torch.isfinite(out.anomaly_map).all()
    assert len(method.channels) == len(method.grids) >= 1


def test_vit_preset_scores_on_openclip(clip_backbone):
    method = create_method("resadpp", clip_backbone, preset="vit", **TINY)
    assert method.config.constraintor == "mlp_se" and not method.config.conditional_flow
    size = clip_backbone.image_size
    assert method.score(images(1, size, 4), bank_for(clip_backbone, size)).image_score.shape == (1,)


def test_checkpoint_round_trip(trained, cnn_backbone):
    method, _, directory = trained
    header = json.loads((directory / "resadpp.json").read_text())
    assert header["backbone"]["name"] == "effnet-lite0" and header["config"]["epochs"] == 2
    restored = ResADpp.from_checkpoint(directory, cnn_backbone)
    bank = bank_for(cnn_backbone, IMAGE_SIZE)
    query = images(2, IMAGE_SIZE, 9)
    assert torch.allclose(restored.score(query, bank).anomaly_map, method.score(query, bank).anomaly_map)
    assert torch.equal(restored.logp_offsets, method.logp_offsets)


def test_checkpoint_mismatch_is_reported(trained, cnn_backbone, clip_backbone):
    _, _, directory = trained
    other = create_method("resadpp", cnn_backbone, **{**TINY, "coupling_layers": 2})
    with pytest.raises(MethodError, match="coupling_layers"):
        other.load_checkpoint(directory)
    with pytest.raises(MethodError, match="backbone"):
        create_method("resadpp", clip_backbone, **TINY).load_checkpoint(directory)
    with pytest.raises(MethodError, match="missing"):
        other.load_checkpoint(directory / "nowhere")


def test_bad_inputs_raise_clear_errors(cnn_backbone, clip_backbone):
    with pytest.raises(MethodError, match="unknown resadpp option"):
        create_method("resadpp", cnn_backbone, epoch=3)
    method = create_method("resadpp", cnn_backbone, **TINY)
    with pytest.raises(MethodError, match="bank has 4 layers"):
        method.score(images(1, IMAGE_SIZE, 0), bank_for(clip_backbone, clip_backbone.image_size))
    wrong_dim = bank_for(cnn_backbone, IMAGE_SIZE)
    wrong_dim.features[0] = torch.zeros(5, 7)
    with pytest.raises(MethodError, match="bank layer 0"):
        method.score(images(1, IMAGE_SIZE, 0), wrong_dim)
    only_anomalies = train_category(IMAGE_SIZE)
    only_anomalies.labels = torch.ones(4, dtype=torch.long)
    with pytest.raises(MethodError, match="stage 1 needs normal"):
        method.fit([only_anomalies])


def _flow_logps_through_freia(self, level, features):
    """The scoring flows as they ran before `forward_grids`: FrEIA's forward on every row with its
    concatenated positional condition, in position_batch chunks."""
    from residual_core.methods.resadpp.flow import position_rows
    from residual_core.methods.resadpp.losses import gaussian_logp

    b, c, h, w = features.shape
    rows = features.permute(0, 2, 3, 1).reshape(-1, c)
    pos = position_rows(self.config.pos_embed_dim, b, h, w, rows.device)
    normal, abnormal = [], []
    for start in range(0, rows.shape[0], self.config.position_batch):
        chunk = slice(start, start + self.config.position_batch)
        z, log_jac = self.flows[level](rows[chunk], pos[chunk])
        normal.append(gaussian_logp(z, log_jac, 0.0))
        abnormal.append(gaussian_logp(z, log_jac, 1.0))
    return torch.cat(normal).reshape(b, h, w), torch.cat(abnormal).reshape(b, h, w)


def _quantize_map_through_cdist(self, features):
    b, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, c)
    return self.embedding(self.nearest(flat)).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def test_scores_equal_the_scoring_before_the_fast_flows_and_vq(trained, cnn_backbone, monkeypatch):
    """Per-position condition terms (forward_grids) and the blocked VQ lookup change nothing but float
    rounding: maps and image scores as with FrEIA's forward on every row and cdist + argmin."""
    from dataclasses import replace

    from residual_core.methods.resadpp.vq import ResidualCodebook

    method, _, _ = trained
    # the FrEIA reference below runs in position_batch chunks: 1 grid each
    monkeypatch.setattr(method, "config", replace(method.config, position_batch=300))
    bank, query = bank_for(cnn_backbone, IMAGE_SIZE), images(3, IMAGE_SIZE, 11)
    fast = method.score(query, bank)
    monkeypatch.setattr(ResADpp, "_flow_logps", _flow_logps_through_freia)
    monkeypatch.setattr(ResidualCodebook, "quantize_map", _quantize_map_through_cdist)
    before = method.score(query, bank)
    torch.testing.assert_close(fast.anomaly_map, before.anomaly_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.image_score, before.image_score, atol=1e-5, rtol=1e-5)


def test_scoring_in_accelerator_sized_flow_steps_changes_only_rounding(trained, cnn_backbone, monkeypatch):
    """Off the CPU the flows score a whole batch per step (the authors' validate.py) instead of cache-sized
    steps: the same maps and scores up to float rounding (run here on the CPU)."""
    from residual_core.methods.resadpp import method as method_module

    assert method_module.flow_step_rows(torch.device("cuda")) == method_module.ACCELERATOR_FLOW_ROWS
    assert method_module.flow_step_rows(torch.device("cpu")) == method_module.CPU_FLOW_ROWS
    method, _, _ = trained
    bank, query = bank_for(cnn_backbone, IMAGE_SIZE), images(3, IMAGE_SIZE, 11)
    monkeypatch.setattr(method_module, "flow_step_rows", lambda device: 300)  # 1 grid per step
    chunked = method.score(query, bank)
    monkeypatch.setattr(method_module, "flow_step_rows", lambda device: 1 << 18)
    whole = method.score(query, bank)
    monkeypatch.setattr(method_module, "flow_step_rows", lambda device: 70)  # runs of 60 positions
    runs = method.score(query, bank)
    for other in (whole, runs):
        torch.testing.assert_close(other.anomaly_map, chunked.anomaly_map, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.image_score, chunked.image_score, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("grids", "positions", "rows"), [(3, 300, 300), (3, 300, 1000), (2, 300, 70),
                                                          (1, 7, 1), (4, 10, 25)])
def test_grid_steps_cover_every_row_once_with_its_positions(grids, positions, rows):
    from residual_core.methods.resadpp.method import grid_steps

    covered = []
    for chunk, where in grid_steps(grids, positions, rows):
        held = list(range(grids * positions))[chunk]
        run = list(range(positions))[where]
        assert held and len(held) <= max(rows, positions) and len(held) % len(run) == 0
        assert [r % positions for r in held] == run * (len(held) // len(run))  # each row's own position
        covered += held
    assert covered == list(range(grids * positions))
