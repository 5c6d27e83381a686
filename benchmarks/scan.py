"""`scan` throughput vs bare backbone forward throughput, local and s3:// input, with peak memory.

Generates an archive of crops of scikit-image photos, then on the same machine and batch size:
1. bare backbone: `forward_features` on preprocessed batches already in memory (images/s);
2. `scan` of the local directory and 3. of the same archive on a local S3 server (moto), with a
fixed threshold (calibration is a separate scan of the normals); images/s over the scoring phase
(the Ray Data pipeline, actor start included), and the peak RSS of the driver and of the Ray worker
processes (sampled every 0.2 s).

    .venv/bin/python benchmarks/scan.py [--per-category 500] [--image-size 128] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class WorkerMemory:
    """Peak memory of this process's Ray worker descendants (local Ray) and of this process, sampled in
    a thread: resident size, and its private (`RssAnon`) and shared-memory (`RssShmem`: pages of Ray's
    object store mapped into the process) parts, each peak on its own."""

    def __init__(self) -> None:
        self.peak_mb = 0.0  # largest worker RSS
        self.peak_anon_mb = 0.0  # largest worker private memory
        self.peak_shmem_mb = 0.0  # largest worker shared memory (object store pages it touched)
        self.driver_anon_mb = 0.0
        self.driver_shmem_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _status_mb(pid: int) -> dict[str, float]:
        """RssAnon and RssShmem of a process in MiB (Linux)."""
        out = {}
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    name, value = line.split(":")
                    out[name] = int(value.split()[0]) / 1024
        return out

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                own = self._status_mb(me.pid)
                self.driver_anon_mb = max(self.driver_anon_mb, own.get("RssAnon", 0.0))
                self.driver_shmem_mb = max(self.driver_shmem_mb, own.get("RssShmem", 0.0))
            except OSError:  # not Linux
                pass
            for child in me.children(recursive=True):
                try:
                    if "ray::" in " ".join(child.cmdline()[:1]) or child.name().startswith("ray::"):
                        self.peak_mb = max(self.peak_mb, child.memory_info().rss / 2**20)
                        parts = self._status_mb(child.pid)
                        self.peak_anon_mb = max(self.peak_anon_mb, parts.get("RssAnon", 0.0))
                        self.peak_shmem_mb = max(self.peak_shmem_mb, parts.get("RssShmem", 0.0))
                except Exception:  # noqa: BLE001 - processes come and go
                    continue
            time.sleep(0.2)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bare_backbone(config, archive: str, batch_size: int, repeats: int) -> float:
    """Images/s of the backbone's forward on preprocessed batches (no I/O, no decoding)."""
    from dataclasses import asdict

    import torch

    from residual_core.images import decode_image, image_to_tensor
    from workflows.pipelines.models import create_backbone_from_config

    backbone = create_backbone_from_config(asdict(config.backbone), "cpu").eval()
    paths = sorted(Path(archive).rglob("*.png"))[:batch_size]
    batch = torch.stack([image_to_tensor(decode_image(p.read_bytes()), backbone.image_size, backbone.mean,
                                         backbone.std) for p in paths])
    with torch.no_grad():
        backbone.forward_features(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            backbone.forward_features(batch)
    return repeats * len(paths) / (time.perf_counter() - start)


def scan_once(config, archive: str, references: str, output: str) -> dict:
    from workflows.pipelines.scan import ScanOptions, run_scan

    options = ScanOptions(input=archive, output=output, references=references, threshold=1.0,
                          shard_size=64)
    with WorkerMemory() as workers:
        summary = run_scan(config, options, progress=False)
    return {"images_per_s": summary["throughput_images_per_s"], "images": summary["seen"],
            "seconds": summary["this_run"]["seconds"], "worker_peak_rss_mb": workers.peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-category", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backbone", default="effnet-lite0")
    args = parser.parse_args()

    import ray

    from tests.fixtures.s3 import MotoServer
    from tests.workflows.scan.archive import upload, write_archive, write_normals
    from workflows import storage
    from workflows.config import load_config
    from workflows.pipelines.ray_runtime import init_ray

    server = MotoServer().start()
    os.environ.update(server.env())  # before Ray starts: its workers inherit the S3 settings
    server.create_bucket("bench")
    try:
        with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
            archive, refs = f"{tmp}/archive", f"{tmp}/references"
            write_archive(archive, per_category=args.per_category, bad=False, no_reference_images=0)
            write_normals(refs, 4, seed=1)
            upload(archive, "s3://bench/archive")
            upload(refs, "s3://bench/references")
            config = load_config(None, [
                f"backbone.spec={args.backbone}", f"backbone.image_size={args.image_size}",
                f"evaluate.batch_size={args.batch_size}", "device=cpu", "tracking.enabled=false"])
            bare = bare_backbone(config, archive, args.batch_size, args.repeats)
            init_ray(num_cpus=os.cpu_count())  # as the CLI starts its local Ray
            local = scan_once(config, archive, refs, f"{tmp}/out-local")
            remote = scan_once(config, "s3://bench/archive", "s3://bench/references", "s3://bench/out")
            driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            ray.shutdown()
    finally:
        server.stop()
    print(f"backbone {args.backbone} @ {args.image_size}px, batch {args.batch_size}, "
          f"{local['images']} images, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| input | images/s | % of bare backbone | scoring phase s | worker peak RSS MiB |")
    print("|---|---|---|---|---|")
    print(f"| bare backbone forward | {bare:.1f} | 100% | - | - |")
    for name, result in (("scan local dir", local), ("scan s3:// (moto)", remote)):
        print(f"| {name} | {result['images_per_s']:.1f} | {100 * result['images_per_s'] / bare:.0f}% | "
              f"{result['seconds']:.1f} | {result['worker_peak_rss_mb']:.0f} |")
    print(f"driver peak RSS: {driver:.0f} MiB")
    storage.clear_cache()


if __name__ == "__main__":
    main()
