"""Res2CLIP checkpoints: adapter weights as safetensors plus a JSON header.

Layout of a checkpoint directory:
  res2clip.json         {"format_version", "method", "config", "plan", "dims", "backbone",
                         "training_datasets"}
  adapters.safetensors  flat state dict with the authors' module prefixes (`vis_adapters.<layer>.`,
                        `res_vis_local_adapters.<layer>.`, `res_vis_global_adapter.`,
                        `res_text_adapter.`, `text_adapter.`)
Loading compares the header with the method it goes into and fails naming every mismatch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from residual_core.methods.base import MethodError

FORMAT_VERSION = 1
HEADER_FILE = "res2clip.json"
WEIGHTS_FILE = "adapters.safetensors"
AUTHORS_GROUPS = (
    "vis_adapters",
    "res_vis_local_adapters",
    "res_vis_global_adapter",
    "res_text_adapter",
    "text_adapter",
)


def backbone_identity_dict(backbone) -> dict:
    """The backbone identity as JSON-able dict ({} for an object without `identity`)."""
    identity = getattr(backbone, "identity", None)
    if identity is None:
        return {}
    data = asdict(identity) if is_dataclass(identity) else dict(vars(identity))
    return json.loads(json.dumps(data, default=list))


def write_checkpoint(directory: str | Path, header: dict, state: dict[str, Tensor]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    full_header = {"format_version": FORMAT_VERSION, "method": "res2clip", **header}
    (directory / HEADER_FILE).write_text(json.dumps(full_header, indent=2, sort_keys=True))


def read_header(directory: str | Path) -> dict:
    path = Path(directory) / HEADER_FILE
    if not path.is_file():
        raise MethodError(f"res2clip checkpoint {str(directory)!r}: missing {HEADER_FILE}")
    header = json.loads(path.read_text())
    if header.get("method") != "res2clip":
        raise MethodError(
            f"checkpoint {str(directory)!r} is for method {header.get('method')!r}, not res2clip"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise MethodError(
            f"res2clip checkpoint {str(directory)!r}: format_version {header.get('format_version')} "
            f"is not the supported {FORMAT_VERSION}"
        )
    return header


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise MethodError(f"res2clip checkpoint {str(directory)!r}: missing {WEIGHTS_FILE}")
    return load_file(str(path))


def header_mismatches(saved: dict, expected: dict) -> list[str]:
    """Differences between the compatibility-relevant header fields ("field: saved != expected")."""
    problems = []
    for key in ("plan", "dims"):
        if saved.get(key) != expected.get(key):
            problems.append(f"{key}: checkpoint {saved.get(key)} != method {expected.get(key)}")
    saved_backbone, expected_backbone = saved.get("backbone", {}), expected.get("backbone", {})
    for key in sorted(set(saved_backbone) | set(expected_backbone)):
        if saved_backbone.get(key) != expected_backbone.get(key):
            saved_value, expected_value = saved_backbone.get(key), expected_backbone.get(key)
            problems.append(f"backbone.{key}: checkpoint {saved_value!r} != method {expected_value!r}")
    return problems


def check_state(saved: dict[str, Tensor], expected: dict[str, Tensor]) -> list[str]:
    """Missing / unexpected keys and shape mismatches between two state dicts."""
    problems = [f"missing tensor {key}" for key in sorted(set(expected) - set(saved))]
    problems += [f"unexpected tensor {key}" for key in sorted(set(saved) - set(expected))]
    for key in sorted(set(saved) & set(expected)):
        if saved[key].shape != expected[key].shape:
            problems.append(
                f"tensor {key}: shape {tuple(saved[key].shape)} != expected {tuple(expected[key].shape)}"
            )
    return problems


def import_authors_state(path: str | Path) -> dict[str, Tensor]:
    """Flatten an authors' `checkpoint_ep*.pth` ({group: state_dict}) into our key layout."""
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    unknown = sorted(set(raw) - set(AUTHORS_GROUPS))
    if unknown:
        raise MethodError(f"{str(path)!r} is not a Res2CLIP authors' checkpoint: unknown groups {unknown}")
    return {f"{group}.{key}": value for group in AUTHORS_GROUPS for key, value in raw.get(group, {}).items()}
