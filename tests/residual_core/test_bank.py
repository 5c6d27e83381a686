import json
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from residual_core import faiss_index
from residual_core.bank import (
    FORMAT_VERSION,
    BankError,
    BankHeader,
    BankMismatchError,
    build_bank,
    coreset_bank,
    load_bank,
    read_header,
    save_bank,
    select_reference_ids,
)
from residual_core.faiss_index import IndexSpec
from residual_core.matching import match_bank_layer, parse_strategy


@dataclass(frozen=True)
class StandInIdentity:
    name: str = "stand-in"
    weights_sha256: str = ""
    layers: tuple[int, ...] = (1, 2)
    image_size: int = 32


@dataclass
class StandInFeatures:
    patch_tokens: list
    grids: list
    global_embedding: torch.Tensor | None


class StandInBackbone(nn.Module):
    """Two conv layers (8x8 and 4x4 grids) and a pooled global embedding: the Backbone duck type."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Conv2d(3, 6, 4, stride=4)
        self.second = nn.Conv2d(6, 10, 2, stride=2)
        self.identity = StandInIdentity()

    def forward_features(self, images):
        first = self.first(images)
        second = self.second(first)
        tokens = [f.flatten(2).transpose(1, 2) for f in (first, second)]
        return StandInFeatures(tokens, [tuple(f.shape[-2:]) for f in (first, second)], second.mean((2, 3)))


def make_bank(k=3, seed=5):
    images = torch.randn(k, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids = [f"img{i}" for i in range(k)]
    return build_bank(
        StandInBackbone(), images, image_ids=ids, dataset="toy", category="widget", seed=seed, batch_size=2
    )


def test_build_bank_layout():
    bank = make_bank()
    assert [tuple(f.shape) for f in bank.features] == [(3 * 64, 6), (3 * 16, 10)]
    assert bank.grids == [(8, 8), (4, 4)]
    assert bank.positions[1][:5].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    assert torch.equal(bank.positions[1][16:32], bank.positions[1][:16])  # each shot a whole grid
    assert bank.global_embeddings.shape == (3, 10)
    header = bank.header
    assert (header.format_version, header.layers, header.k_shot, header.seed) == (
        FORMAT_VERSION,
        [1, 2],
        3,
        5,
    )
    assert header.backbone["name"] == "stand-in" and header.image_ids == ["img0", "img1", "img2"]
    backbone = StandInBackbone()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    direct = backbone.forward_features(images).patch_tokens[0].reshape(-1, 6)
    assert torch.allclose(bank.features[0], direct, atol=1e-6)  # raw features, batch split irrelevant


def test_to_moves_the_tensors_and_keeps_the_rest():
    """`to` gives the bank on another device (here the meta device, which needs no GPU); the original is
    untouched and the header, grids and FAISS indexes are shared."""
    bank = make_bank()
    bank.ensure_indexes()
    moved = bank.to("meta")
    assert moved is not bank and moved.header is bank.header and moved.grids == bank.grids
    assert moved.indexes is bank.indexes and moved.index_spec == bank.index_spec
    tensors = moved.features + moved.positions + [moved.global_embeddings]
    assert all(t.device.type == "meta" for t in tensors)
    assert [t.shape for t in moved.features] == [t.shape for t in bank.features]
    assert all(t.device.type == "cpu" for t in bank.features + bank.positions + [bank.global_embeddings])


def test_save_load_round_trip(tmp_path):
    bank = make_bank()
    save_bank(bank, tmp_path / "bank")
    loaded = load_bank(tmp_path / "bank", expect=bank.header)
    assert loaded.header == bank.header and loaded.grids == bank.grids
    for a, b in zip(loaded.features + loaded.positions, bank.features + bank.positions, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loaded.global_embeddings, bank.global_embeddings)
    assert [i.ntotal for i in loaded.indexes] == [192, 48]
    queries = faiss_index.normalise_rows(torch.randn(4, 6))
    assert torch.equal(
        faiss_index.search(loaded.indexes[0], queries, 3)[1],
        faiss_index.search(bank.indexes[0], queries, 3)[1],
    )


def test_header_mismatch_names_the_fields(tmp_path):
    bank = make_bank()
    save_bank(bank, tmp_path)
    expected = replace(bank.header, seed=6, backbone={**bank.header.backbone, "weights_sha256": "abc"})
    with pytest.raises(BankMismatchError, match="backbone: stored .*; seed: stored 5 != expected 6"):
        load_bank(tmp_path, expect=expected)


def test_format_version_missing_and_corrupt_files(tmp_path):
    save_bank(make_bank(), tmp_path)
    header_path = tmp_path / "header.json"
    stored = json.loads(header_path.read_text())
    (tmp_path / "layer1.faiss").write_bytes(b"garbage")
    with pytest.raises(BankError, match="layer1.faiss: unreadable FAISS index"):
        load_bank(tmp_path)
    (tmp_path / "layer0_features.npy").unlink()
    with pytest.raises(BankError, match="layer0_features.npy: missing bank file"):
        load_bank(tmp_path)
    stored["header"]["format_version"] = FORMAT_VERSION + 1
    header_path.write_text(json.dumps(stored))
    with pytest.raises(BankMismatchError, match="format version"):
        read_header(tmp_path)
    header_path.unlink()
    with pytest.raises(BankError, match="no bank header"):
        load_bank(tmp_path)


def test_select_reference_ids_is_deterministic_and_nested():
    candidates = [f"train/{i:03d}.png" for i in range(50)]
    four = select_reference_ids(candidates, 4, seed=1)
    assert four == select_reference_ids(list(reversed(candidates)), 4, seed=1)
    assert select_reference_ids(candidates, 2, seed=1) == four[:2]
    assert select_reference_ids(candidates, 4, seed=2) != four
    with pytest.raises(ValueError, match="cannot choose k=51"):
        select_reference_ids(candidates, 51, seed=1)
    with pytest.raises(ValueError, match="duplicates"):
        select_reference_ids(["a", "a"], 1, seed=1)


def test_coreset_bank_shrinks_and_round_trips(tmp_path):
    bank = make_bank()
    small = coreset_bank(bank, fraction=0.25, seed=0)
    assert [f.shape[0] for f in small.features] == [48, 12]
    chosen_rows = {tuple(row.tolist()) for row in bank.features[1]}
    assert all(tuple(row.tolist()) in chosen_rows for row in small.features[1])
    small.ensure_indexes(IndexSpec(kind="hnsw", hnsw_m=8))
    save_bank(small, tmp_path)
    loaded = load_bank(tmp_path)
    assert loaded.coreset == {"fraction": 0.25, "size": None, "seed": 0}
    assert loaded.index_spec.kind == "hnsw" and loaded.indexes[0].ntotal == 48
    strategy = parse_strategy("radial_1nn")
    queries = torch.randn(2, 16, 10)
    assert match_bank_layer(queries, loaded, 1, strategy).matched.shape == (2, 16, 10)
    with pytest.raises(ValueError, match="whole reference grids"):
        match_bank_layer(queries, loaded, 1, parse_strategy("1nn", pooling=True))


def test_match_bank_layer_paths_agree():
    bank = make_bank()
    queries = torch.randn(2, 64, 6, generator=torch.Generator().manual_seed(9))
    for text in ("sparse_radial_knn", "radial_1nn", "2nn"):
        strategy = parse_strategy(text)
        brute = match_bank_layer(queries, bank, 0, strategy)
        fast = match_bank_layer(queries, bank, 0, strategy, path="faiss", candidates=8)
        assert torch.allclose(brute.matched, fast.matched, atol=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="for 2 image ids"):
        build_bank(
            StandInBackbone(),
            torch.randn(3, 3, 32, 32),
            image_ids=["a", "b"],
            dataset="d",
            category="c",
            seed=0,
        )
    with pytest.raises(BankError, match="lacks fields"):
        BankHeader.from_dict({"format_version": 1})


def test_real_tiny_openclip_backbone_bank(tiny_openclip_checkpoint, tmp_path):
    backbones = pytest.importorskip("residual_core.backbones")
    backbone = backbones.create_backbone(tiny_openclip_checkpoint.spec)
    size = backbone.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    bank = build_bank(backbone, images, image_ids=["a", "b"], dataset="toy", category="c", seed=0)
    assert bank.header.backbone == backbone.identity.to_dict()
    assert bank.header.backbone["weights_sha256"] == tiny_openclip_checkpoint.sha256
    save_bank(bank, tmp_path)
    loaded = load_bank(tmp_path, expect=bank.header)
    query = backbone.forward_features(images[:1])
    for layer, tokens in enumerate(query.patch_tokens):
        result = match_bank_layer(tokens, loaded, layer, parse_strategy(), grid=query.grids[layer])
        # the query is reference image "a": its own patches are in the bank
        assert result.anomaly_map.abs().max() < 0.05
