"""Few-shot reference banks: raw per-layer patch features, grid positions, global embeddings, FAISS indexes.

A bank is saved as one directory: `header.json` (written last, so a complete header means a complete
bank), per layer `layer{i}_features.npy`, `layer{i}_positions.npy` and `layer{i}.faiss`, and
`global_embeddings.npy` when the backbone has a global embedding. Loading checks the format version and,
when asked, that the header equals the expected one (backbone identity, layers, k, seed, image ids, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from residual_core import coreset, faiss_index
from residual_core.faiss_index import IndexSpec
from residual_core.matching.penalties import grid_positions

FORMAT_VERSION = 1
HEADER_FILE = "header.json"
GLOBAL_FILE = "global_embeddings.npy"


class BankError(ValueError):
    """A bank directory is missing, incomplete or corrupt."""


class BankMismatchError(BankError):
    """A stored bank's header differs from the expected one."""


@dataclass
class BankHeader:
    """What a bank was built from; equal headers mean interchangeable banks."""

    format_version: int
    backbone: dict
    layers: list[int]
    k_shot: int
    seed: int
    image_ids: list[str]
    dataset: str
    category: str

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as stored

    @classmethod
    def from_dict(cls, data: dict) -> BankHeader:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise BankError(f"bank header lacks fields {sorted(missing)}")
        return cls(**{name: data[name] for name in names})

    def differences(self, other: BankHeader) -> list[str]:
        """'field: stored != expected' for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{name}: stored {mine[name]!r} != expected {theirs[name]!r}"
            for name in mine
            if mine[name] != theirs[name]
        ]


@dataclass
class ReferenceBank:
    """Per-layer raw patch features [N_l, D_l] (float32) with (row, col) positions [N_l, 2] on grids[l].

    `indexes` (one FAISS index per layer over L2-normalised features) are built on demand.
    `coreset` records a subsampling ({"fraction"/"size", "seed"}) or is None for a full bank.
    """

    header: BankHeader
    features: list[torch.Tensor]
    positions: list[torch.Tensor]
    grids: list[tuple[int, int]]
    global_embeddings: torch.Tensor | None = None
    indexes: list[faiss.Index] | None = None
    index_spec: IndexSpec = field(default_factory=IndexSpec)
    coreset: dict | None = None

    def __post_init__(self) -> None:
        layers = len(self.header.layers)
        if not (len(self.features) == len(self.positions) == len(self.grids) == layers):
            raise BankError(
                f"bank has {layers} layers in its header but {len(self.features)} feature, "
                f"{len(self.positions)} position and {len(self.grids)} grid entries"
            )
        self.grids = [tuple(int(v) for v in grid) for grid in self.grids]
        for layer, (feats, pos) in enumerate(zip(self.features, self.positions, strict=True)):
            if feats.ndim != 2 or pos.shape != (feats.shape[0], 2):
                raise BankError(
                    f"layer {layer}: features {tuple(feats.shape)} and positions "
                    f"{tuple(pos.shape)} do not form [N, D] and [N, 2]"
                )

    def to(self, device: torch.device | str) -> ReferenceBank:
        """The same bank with its tensors (features, positions, global embeddings) on `device`; the FAISS
        indexes, header and provenance are shared."""
        embeddings = self.global_embeddings
        return dataclasses.replace(
            self,
            features=[f.to(device) for f in self.features],
            positions=[p.to(device) for p in self.positions],
            global_embeddings=None if embeddings is None else embeddings.to(device),
        )

    def ensure_indexes(self, spec: IndexSpec | None = None, *, device: str = "cpu") -> list[faiss.Index]:
        """Build (once) one FAISS index per layer; move them to `device` ("auto": GPU when usable)."""
        if spec is not None and spec != self.index_spec:
            self.index_spec, self.indexes = spec, None
        if self.indexes is None:
            self.indexes = [faiss_index.build_index(feats, self.index_spec) for feats in self.features]
        self.indexes = [faiss_index.to_device(index, device) for index in self.indexes]
        return self.indexes


def select_reference_ids(candidate_ids: list[str], k: int, seed: int) -> list[str]:
    """Choose `k` ids deterministically from `seed`, independent of the order of `candidate_ids`.

    Ids are ranked by sha256("{seed}:{id}"), so the choice is stable across machines and Python
    versions, and a smaller k for the same seed is a prefix of a larger one.
    """
    unique = set(candidate_ids)
    if len(unique) != len(candidate_ids):
        raise ValueError("candidate image ids contain duplicates")
    if not 1 <= k <= len(unique):
        raise ValueError(f"cannot choose k={k} references from {len(unique)} candidate normal images")
    return sorted(unique, key=lambda image_id: hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest())[:k]


@torch.no_grad()
def build_bank(
    backbone,
    images: torch.Tensor,
    *,
    image_ids: list[str],
    dataset: str,
    category: str,
    seed: int,
    batch_size: int = 8,
) -> ReferenceBank:
    """Extract the raw features of the K reference `images` [K, 3, S, S] into a bank."""
    if images.ndim != 4 or images.shape[0] != len(image_ids):
        raise ValueError(
            f"need images [K, 3, S, S] for {len(image_ids)} image ids, got {tuple(images.shape)}"
        )
    if len(image_ids) == 0:
        raise ValueError("a bank needs at least one reference image")
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    per_layer: list[list[torch.Tensor]] = []
    global_parts: list[torch.Tensor] = []
    grids = None
    for start in range(0, images.shape[0], batch_size):
        output = backbone.forward_features(images[start : start + batch_size].to(device))
        grids = [tuple(grid) for grid in output.grids]
        if not per_layer:
            per_layer = [[] for _ in output.patch_tokens]
        for layer, tokens in enumerate(output.patch_tokens):
            per_layer[layer].append(tokens.detach().float().cpu().reshape(-1, tokens.shape[-1]))
        if output.global_embedding is not None:
            global_parts.append(output.global_embedding.detach().float().cpu())
    identity = backbone.identity
    if hasattr(identity, "to_dict"):
        identity_dict = identity.to_dict()
    else:
        identity_dict = dataclasses.asdict(identity) if dataclasses.is_dataclass(identity) else dict(identity)
    layers = list(identity_dict.get("layers") or range(len(per_layer)))
    header = BankHeader(
        FORMAT_VERSION,
        json.loads(json.dumps(identity_dict)),
        [int(v) for v in layers],
        len(image_ids),
        seed,
        list(image_ids),
        dataset,
        category,
    )
    positions = [grid_positions(grid).repeat(len(image_ids), 1) for grid in grids]
    return ReferenceBank(
        header,
        [torch.cat(parts) for parts in per_layer],
        positions,
        grids,
        torch.cat(global_parts) if global_parts else None,
    )


def coreset_bank(
    bank: ReferenceBank, *, fraction: float | None = None, size: int | None = None, seed: int = 0
) -> ReferenceBank:
    """A smaller bank: per layer, the greedy k-center coreset of the L2-normalised features."""
    features, positions = [], []
    for feats, pos in zip(bank.features, bank.positions, strict=True):
        n_select = coreset.coreset_size(feats.shape[0], fraction=fraction, size=size)
        chosen = coreset.greedy_k_center(faiss_index.normalise_rows(feats.float()), n_select, seed=seed)
        features.append(feats[chosen])
        positions.append(pos[chosen])
    recipe = {"fraction": fraction, "size": size, "seed": seed}
    return ReferenceBank(
        bank.header,
        features,
        positions,
        list(bank.grids),
        bank.global_embeddings,
        None,
        bank.index_spec,
        recipe,
    )


def save_bank(bank: ReferenceBank, directory: str | os.PathLike) -> Path:
    """Write the bank (and its FAISS indexes, built if missing) into `directory`; header last."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    indexes = bank.ensure_indexes()
    for layer, (feats, pos, index) in enumerate(zip(bank.features, bank.positions, indexes, strict=True)):
        np.save(target / f"layer{layer}_features.npy", feats.detach().float().cpu().numpy())
        np.save(target / f"layer{layer}_positions.npy", pos.detach().long().cpu().numpy())
        faiss_index.save_index(index, target / f"layer{layer}.faiss")
    if bank.global_embeddings is not None:
        np.save(target / GLOBAL_FILE, bank.global_embeddings.detach().float().cpu().numpy())
    layout = {
        "grids": [list(grid) for grid in bank.grids],
        "counts": [int(feats.shape[0]) for feats in bank.features],
        "dims": [int(feats.shape[1]) for feats in bank.features],
        "has_global": bank.global_embeddings is not None,
        "index": dataclasses.asdict(bank.index_spec),
        "coreset": bank.coreset,
    }
    temporary = target / (HEADER_FILE + ".tmp")
    temporary.write_text(json.dumps({"header": bank.header.to_dict(), "layout": layout}, indent=2))
    os.replace(temporary, target / HEADER_FILE)
    return target


def read_header(directory: str | os.PathLike) -> tuple[BankHeader, dict]:
    """(header, layout) of a saved bank; BankError when absent, unreadable or of another format."""
    path = Path(directory) / HEADER_FILE
    if not path.is_file():
        raise BankError(f"{path}: no bank header (missing or incompletely written bank)")
    try:
        stored = json.loads(path.read_text())
        raw_header, layout = stored["header"], stored["layout"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BankError(f"{path}: unreadable bank header ({err})") from err
    if raw_header.get("format_version") != FORMAT_VERSION:
        raise BankMismatchError(
            f"{path}: bank format version {raw_header.get('format_version')!r}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    return BankHeader.from_dict(raw_header), layout


def load_bank(
    directory: str | os.PathLike, expect: BankHeader | None = None, *, load_indexes: bool = True
) -> ReferenceBank:
    """Load a bank saved by `save_bank`; with `expect`, fail with BankMismatchError naming every
    field that differs."""
    target = Path(directory)
    header, layout = read_header(target)
    if expect is not None:
        differences = header.differences(expect)
        if differences:
            raise BankMismatchError(f"{target}: bank does not match the request: " + "; ".join(differences))
    features, positions, indexes = [], [], []
    for layer, (count, dim) in enumerate(zip(layout["counts"], layout["dims"], strict=True)):
        feats = _load_array(target / f"layer{layer}_features.npy", (count, dim))
        features.append(torch.from_numpy(feats))
        positions.append(torch.from_numpy(_load_array(target / f"layer{layer}_positions.npy", (count, 2))))
        if load_indexes:
            index = _load_index(target / f"layer{layer}.faiss")
            if index.ntotal != count or index.d != dim:
                raise BankError(
                    f"{target}/layer{layer}.faiss holds {index.ntotal} x {index.d} vectors, "
                    f"the header says {count} x {dim}"
                )
            indexes.append(index)
    global_embeddings = None
    if layout.get("has_global"):
        global_embeddings = torch.from_numpy(_load_array(target / GLOBAL_FILE, None))
    return ReferenceBank(
        header,
        features,
        positions,
        [tuple(g) for g in layout["grids"]],
        global_embeddings,
        indexes if load_indexes else None,
        IndexSpec(**layout["index"]),
        layout.get("coreset"),
    )


def _load_array(path: Path, shape: tuple[int, int] | None) -> np.ndarray:
    if not path.is_file():
        raise BankError(f"{path}: missing bank file")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise BankError(f"{path}: unreadable bank file ({err})") from err
    if shape is not None and array.shape != shape:
        raise BankError(f"{path}: shape {array.shape}, the header says {shape}")
    return array


def _load_index(path: Path) -> faiss.Index:
    if not path.is_file():
        raise BankError(f"{path}: missing FAISS index file")
    try:
        return faiss_index.load_index(path)
    except RuntimeError as err:
        raise BankError(f"{path}: unreadable FAISS index ({err})") from err
