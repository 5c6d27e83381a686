"""FAISS indexes for reference banks: exact inner product (default), IVF and HNSW.

Vectors are L2-normalised before indexing so that inner product equals cosine similarity, the
similarity both Res2CLIP and ResAD match on. Indexes live on the CPU unless a GPU build of FAISS
sees a GPU; then `to_device` moves them there with one `StandardGpuResources` per process.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import faiss
import numpy as np
import torch

INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexSpec:
    """How to index one layer of a bank.

    kind: "flat" (exact), "ivf" (inverted lists, `nlist` cells, `nprobe` probed) or
    "hnsw" (graph with `hnsw_m` links, `ef_search` / `ef_construction` beam widths). IVF centroids
    are trained on at most `train_size` vectors drawn with `train_seed`.
    """

    kind: str = "flat"
    nlist: int = 1024
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 80
    train_size: int = 65_536
    train_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind {self.kind!r} is not one of {INDEX_KINDS}")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"index option {name} must be >= 1, got {getattr(self, name)}")

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    @classmethod
    def parse(cls, text: str) -> IndexSpec:
        """Parse "flat", "ivf", "ivf:nlist=256,nprobe=8", "hnsw:hnsw_m=16,ef_search=64"."""
        match = re.fullmatch(r"\s*(\w+)\s*(?::(.*))?", text)
        if not match:
            raise ValueError(f"cannot parse index spec {text!r}")
        options: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in (match.group(2) or "").split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in cls.__dataclass_fields__ or key.strip() == "kind":
                raise ValueError(f"index spec {text!r}: bad option {item!r}")
            try:
                options[key.strip()] = int(value)
            except ValueError as err:
                raise ValueError(f"index spec {text!r}: option {key.strip()} needs an integer") from err
        return cls(kind=match.group(1).lower(), **options)


def as_float32_numpy(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """Contiguous float32 numpy view/copy (what FAISS accepts)."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)


def normalise_rows(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row (the authors' `x / x.norm(dim=-1, keepdim=True)`)."""
    return vectors / vectors.norm(dim=-1, keepdim=True)


def build_index(
    vectors: torch.Tensor, spec: IndexSpec | None = None, *, normalise: bool = True
) -> faiss.Index:
    """Index `vectors` [N, D] for inner-product search (on normalised rows unless `normalise=False`)."""
    spec = spec or IndexSpec()
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"build_index needs a non-empty [N, D] matrix, got shape {tuple(vectors.shape)}")
    data = as_float32_numpy(normalise_rows(vectors.float()) if normalise else vectors)
    n, dim = data.shape
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    else:
        nlist = max(1, min(spec.nlist, n // 39 if n >= 39 else 1))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = spec.train_seed
        index.cp.max_points_per_centroid = max(39, spec.train_size // nlist)  # FAISS's own subsampling
        index.train(data)
        index.nprobe = min(spec.nprobe, nlist)
    index.add(data)
    return index


def index_is_exact(index: faiss.Index) -> bool:
    """True for brute-force (flat) indexes, whose top-K is the true top-K."""
    cpu = index_to_cpu(index) if _is_gpu_index(index) else index
    return isinstance(faiss.downcast_index(cpu), faiss.IndexFlat)


def search(index: faiss.Index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` inner products of (already normalised) `queries` [Q, D]: (scores [Q,k], ids [Q,k] long).

    Results come back on the queries' device. Missing results (approximate indexes) have id -1.
    """
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be [Q, {index.d}], got {tuple(queries.shape)}")
    k = min(k, index.ntotal)
    scores, ids = index.search(as_float32_numpy(queries), k)
    return (torch.from_numpy(scores).to(queries.device), torch.from_numpy(ids).to(queries.device, torch.long))


# ---- GPU placement ---------------------------------------------------------------------------------
_GPU_LOCK = threading.Lock()
_GPU_RESOURCES = None


def gpu_available() -> bool:
    """A GPU build of FAISS that sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def gpu_resources():
    """The process-wide FAISS GPU resource object (created once, on first use)."""
    global _GPU_RESOURCES
    if not gpu_available():
        raise RuntimeError("no FAISS GPU support here (faiss-cpu build or no visible GPU)")
    with _GPU_LOCK:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        return _GPU_RESOURCES


def _is_gpu_index(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")


def to_device(index: faiss.Index, device: str | torch.device = "auto", gpu_id: int = 0) -> faiss.Index:
    """Move an index to the GPU when `device` asks for cuda (or "auto" and a GPU is usable), else CPU.

    HNSW has no GPU implementation in FAISS and stays on the CPU.
    """
    device_type = str(device).split(":")[0]
    want_gpu = gpu_available() if device_type == "auto" else device_type == "cuda"
    if want_gpu and not gpu_available():
        raise RuntimeError("index requested on cuda but FAISS has no GPU support here")
    if not want_gpu:
        return index_to_cpu(index)
    if _is_gpu_index(index) or isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return index
    return faiss.index_cpu_to_gpu(gpu_resources(), gpu_id, index)


def index_to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if _is_gpu_index(index) else index


# ---- serialisation ----------------------------------------------------------------------------------
def index_to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index_to_cpu(index)).tobytes()


def index_from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def save_index(index: faiss.Index, path) -> None:
    with open(path, "wb") as handle:
        handle.write(index_to_bytes(index))


def load_index(path) -> faiss.Index:
    with open(path, "rb") as handle:
        return index_from_bytes(handle.read())


def index_memory_bytes(index: faiss.Index) -> int:
    """Bytes held by the index: counted from its structure for flat / IVF-flat / HNSW-flat indexes
    (no copy made), else the serialised size."""
    index = faiss.downcast_index(index_to_cpu(index))
    vectors = index.ntotal * index.d * 4
    if isinstance(index, faiss.IndexFlat):
        return vectors
    if isinstance(index, faiss.IndexIVFFlat):
        return vectors + index.ntotal * 8 + index.nlist * index.d * 4  # codes, ids, centroids
    if isinstance(index, faiss.IndexHNSWFlat):
        graph = index.hnsw
        return vectors + graph.neighbors.size() * 4 + graph.offsets.size() * 8 + graph.levels.size() * 4
    return len(faiss.serialize_index(index))
