"""Reading weight files safely (safetensors, or torch files with weights_only=True) and loading them
into a model with a clear report when they do not fit."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from residual_core.backbones.base import BackboneError

Opener = Callable[[str], BinaryIO]

_READ_CHUNK = 16 * 1024 * 1024
_MAX_LISTED = 12


class CheckpointError(BackboneError):
    """A weights file cannot be read, or does not fit the model."""


@dataclass
class WeightsFile:
    state_dict: dict[str, Tensor]
    sha256: str
    source: str


def open_local(url: str) -> BinaryIO:
    """The default opener: local paths and file:// URLs only."""
    if "://" in url and not url.startswith("file://"):
        raise CheckpointError(
            f"cannot open {url!r}: only local paths are readable without an opener; "
            "pass opener=... (e.g. workflows.storage.open_url) for object-storage URLs"
        )
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    return open(path, "rb")


def sha256_file(url: str, opener: Opener | None = None) -> str:
    """sha256 hex digest of a file, streamed."""
    digest = hashlib.sha256()
    with (opener or open_local)(url) as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(url: str, opener: Opener | None = None) -> WeightsFile:
    """Read a safetensors or torch weights file from `url` (local path, or through `opener`).

    Local files are hashed by streaming and memory-mapped (torch zip) or read by safetensors directly;
    opener files are read into memory once."""
    if opener is None or opener is open_local:
        path = _local_path(url)
        with open(path, "rb") as handle:
            head = handle.read(16)
        state = _decode(path, head, path.stat().st_size, url)
        return WeightsFile(state_dict=_unwrap(state, url), sha256=sha256_file(url), source=url)
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    with opener(url) as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
            buffer.write(chunk)
    data = buffer.getbuffer()
    state = _decode(buffer, bytes(data[:16]), len(data), url)
    del data
    return WeightsFile(state_dict=_unwrap(state, url), sha256=digest.hexdigest(), source=url)


def _local_path(url: str) -> Path:
    open_local(url).close()  # same checks and errors as the default opener
    return Path(url.removeprefix("file://"))


def _decode(source: Path | io.BytesIO, head: bytes, size: int, url: str) -> object:
    """`source` is a local path or an in-memory file; `head` its first bytes."""
    if size == 0:
        raise CheckpointError(f"weights file {url!r} is empty")
    if head[:4] == b"PK\x03\x04":  # torch zip format
        if _is_torchscript(source):
            raise CheckpointError(
                f"{url!r} is a TorchScript archive (a program, not just weights), which is not loaded; "
                "convert it once with: sd = torch.jit.load(path, map_location='cpu').state_dict(); "
                "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "
                "'weights.safetensors')"
            )
        return _torch_load(source, url, mmap=isinstance(source, Path))
    if _looks_like_safetensors(head, size):
        from safetensors.torch import load as load_safetensors
        from safetensors.torch import load_file

        try:
            if isinstance(source, Path):
                return load_file(str(source), device="cpu")
            return load_safetensors(source.getvalue())
        except Exception as error:  # noqa: BLE001 - re-raised with the file named
            raise CheckpointError(f"{url!r} is not a valid safetensors file: {error}") from error
    return _torch_load(source, url, mmap=False)  # legacy (non-zip) torch pickle


def _torch_load(source: Path | io.BytesIO, url: str, mmap: bool) -> object:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(
            f"{url!r} could not be read as safetensors or as a torch file with weights_only=True: {error}"
        ) from error


def _is_torchscript(source: Path | io.BytesIO) -> bool:
    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return any(name.endswith("/constants.pkl") for name in names)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _unwrap(obj: object, url: str) -> dict[str, Tensor]:
    """Accept a state dict, or a training checkpoint holding one under 'state_dict'/'model'."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{url!r} does not contain a state dict (got {type(obj).__name__})")
    state_dict = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state_dict:
        raise CheckpointError(f"{url!r} holds no tensors")
    if all(k.startswith("module.") for k in state_dict):  # saved from DataParallel/DDP
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def load_checked(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    source: str,
    ignore_prefixes: Iterable[str] = (),
) -> None:
    """Load `state_dict` into `model` strictly; on any misfit raise one error listing the missing,
    unexpected and mis-shaped keys. Keys under `ignore_prefixes` may be absent or differ."""
    ignore = tuple(ignore_prefixes)
    expected = model.state_dict()

    def ignored(name: str) -> bool:
        return bool(ignore) and name.startswith(ignore)

    missing = sorted(k for k in expected if k not in state_dict and not ignored(k))
    unexpected = sorted(k for k in state_dict if k not in expected and not ignored(k))
    misshaped = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state_dict
        if k in expected and not ignored(k) and state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        parts = [f"weights {source!r} do not fit {type(model).__name__}:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:_MAX_LISTED])
                more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
                parts.append(f"{len(items)} {label} keys: {shown}{more}")
        raise CheckpointError("\n  ".join(parts))
    usable = {k: v for k, v in state_dict.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(usable, strict=not ignore)
