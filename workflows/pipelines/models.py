"""Build backbones, methods and banks from configs and storage URLs (inside Ray workers or the driver)."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, is_dataclass

from workflows import storage
from workflows.pipelines.artifacts import local_dir


@dataclass(frozen=True)
class BackboneInfo:
    """What the driver needs to know about a backbone without keeping it: identity and preprocessing."""

    identity: dict
    identity_key: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_text: bool

    def to_dict(self) -> dict:
        return asdict(self)


def create_backbone_from_config(backbone: dict, device: str = "cpu"):
    from residual_core.backbones import create_backbone

    layers = backbone.get("layers")
    return create_backbone(
        backbone["spec"],
        layers=tuple(layers) if layers else None,
        image_size=backbone.get("image_size"),
        device=device,
        opener=storage.open_url,
    )


def backbone_info(backbone_module) -> BackboneInfo:
    identity = backbone_module.identity
    return BackboneInfo(
        identity=asdict(identity),
        identity_key=identity.key(),
        image_size=int(backbone_module.image_size),
        mean=tuple(float(v) for v in backbone_module.mean),
        std=tuple(float(v) for v in backbone_module.std),
        has_text=bool(getattr(backbone_module, "has_text", False)),
    )


_INFO_CACHE: dict[str, BackboneInfo] = {}


def probe_backbone(backbone: dict) -> BackboneInfo:
    """Identity and preprocessing of a configured backbone (built once per process, on CPU)."""
    key = json.dumps(backbone, sort_keys=True)
    if key not in _INFO_CACHE:
        _INFO_CACHE[key] = backbone_info(create_backbone_from_config(backbone, "cpu"))
    return _INFO_CACHE[key]


def method_preprocess(method) -> str:
    """The `residual_core.preprocess` preset of a configured method (`MethodConfig` or its dict), from
    its name and params: resolved once on the driver, then carried by bank requests and scoring jobs."""
    from residual_core.methods import method_preprocess as resolve

    data = asdict(method) if is_dataclass(method) else dict(method)
    return resolve(data["name"], data.get("params") or {})


def load_method(backbone: dict, method: dict, device: str, backbone_cache: OrderedDict | None = None):
    """Build the configured method on its backbone; load its checkpoint when one is given."""
    from residual_core.methods import create_method

    cache = backbone_cache if backbone_cache is not None else OrderedDict()
    key = json.dumps([backbone, device], sort_keys=True)
    if key not in cache:
        cache[key] = create_backbone_from_config(backbone, device).eval()
        while len(cache) > 1:  # one backbone per process: they are the large part
            cache.popitem(last=False)
    instance = create_method(method["name"], cache[key], **(method.get("params") or {}))
    if method.get("checkpoint"):
        instance.load_checkpoint(local_dir(method["checkpoint"]))
    return instance.to(device).eval()


def load_bank_url(url: str, device: str):
    """Load a committed reference bank from storage and move its tensors to `device`."""
    from residual_core.bank import load_bank

    bank = load_bank(local_dir(url))
    return bank if device == "cpu" else bank.to(device)


def content_key(payload: dict) -> str:
    """Short stable hash of a JSON-able payload: content-addressed storage keys."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
