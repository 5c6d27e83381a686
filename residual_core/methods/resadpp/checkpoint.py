"""ResAD++ checkpoints: learnable state as safetensors plus a JSON config, checked on load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from residual_core.methods.base import MethodError
from residual_core.methods.resadpp.config import ARCHITECTURE_FIELDS, make_config

FORMAT_VERSION = 1
WEIGHTS_FILE = "resadpp.safetensors"
CONFIG_FILE = "resadpp.json"


def backbone_identity(backbone) -> dict:
    identity = getattr(backbone, "identity", None)
    if identity is None:
        return {}
    data = dataclasses.asdict(identity) if dataclasses.is_dataclass(identity) else dict(identity)
    if "layers" in data:
        data["layers"] = list(data["layers"])
    return data


def checkpoint_header(method) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "config": method.config.to_dict(),
        "backbone": backbone_identity(method.backbone),
        "channels": list(method.channels),
        "grids": [list(g) for g in method.grids],
    }


def save_checkpoint(method, directory: str | Path) -> None:
    """Write <dir>/resadpp.safetensors and <dir>/resadpp.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.learnable_state().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (directory / CONFIG_FILE).write_text(json.dumps(checkpoint_header(method), indent=2, sort_keys=True))


def read_header(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MethodError(f"resadpp checkpoint: {path} is missing")
    header = json.loads(path.read_text())
    if header.get("format_version") != FORMAT_VERSION or header.get("method") != "resadpp":
        raise MethodError(f"resadpp checkpoint {directory}: format {header.get('format_version')!r} / method "
                          f"{header.get('method')!r}, expected {FORMAT_VERSION} / 'resadpp'")
    return header


def check_compatible(method, header: dict, directory) -> None:
    """Raise MethodError listing every difference that makes the checkpoint unusable for `method`."""
    problems = []
    mine = checkpoint_header(method)
    if header["backbone"] != mine["backbone"]:
        problems.append(f"backbone {header['backbone']} != {mine['backbone']}")
    if header["channels"] != mine["channels"]:
        problems.append(f"feature channels {header['channels']} != {mine['channels']}")
    for name in ARCHITECTURE_FIELDS:
        if header["config"].get(name) != mine["config"][name]:
            saved, current = header["config"].get(name), mine["config"][name]
            problems.append(f"config {name}: checkpoint {saved!r} != {current!r}")
    if problems:
        raise MethodError(f"resadpp checkpoint {directory} does not fit this method: " + "; ".join(problems))


def load_checkpoint(method, directory: str | Path) -> None:
    """Load weights into `method` after the compatibility check."""
    header = read_header(directory)
    check_compatible(method, header, directory)
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    expected = set(method.learnable_state())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise MethodError(f"resadpp checkpoint {directory}: missing tensors {missing[:5]}, "
                          f"unexpected {extra[:5]}")
    device = method.device
    for prefix in ("vq", "constraintor", "flows", "boundaries"):
        part = {k[len(prefix) + 1:]: v.to(device) for k, v in tensors.items() if k.startswith(prefix + ".")}
        getattr(method, prefix).load_state_dict(part, strict=True)
    method.logp_offsets.copy_(tensors["logp_offsets"].to(device))


def config_from_checkpoint(directory: str | Path):
    """The saved configuration (for building a method before loading its weights)."""
    saved = dict(read_header(directory)["config"])
    preset = saved.pop("preset", "cnn")
    return make_config(preset, **saved)
