"""How cost grows (issue 17's scaling table): with the number of images, with k, with the image size.

`images`: the whole `evaluate` pipeline (1-NN baseline, k=1, EfficientNet-Lite0, 2 actors) on 10^2, 10^3
and 10^4 test images, each count in a fresh process: seconds per image, the driver's peak RSS and the
largest Ray worker's peak RSS, each split into private memory and Ray object-store pages mapped into it.
Flat columns mean nothing grows with the archive.
`shots`: in-memory `method.score` of the baseline (1 torch thread) against banks of k = 1..16 references,
at 224 and 448 px, as a share of the bare forward at the same size, and its matching time per image.

    .venv/bin/python benchmarks/scaling.py images --counts 100 1000 10000 --image-size 128
    .venv/bin/python benchmarks/scaling.py shots --shots 1 2 4 8 16 --sizes 224 448
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _sibling(name: str):
    """Import benchmarks/<name>.py (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_count(count: int, image_size: int, batch_size: int, actors: int) -> dict:
    """One `evaluate` over `count` test images in this (fresh) process: rate and peak memory."""
    from workflows.config import load_config
    from workflows.pipelines.evaluate import run_evaluate
    from workflows.pipelines.index import run_index
    from workflows.pipelines.ray_runtime import init_ray

    pipeline, scan = _sibling("pipeline"), _sibling("scan")
    root = tempfile.mkdtemp(prefix="bench-scaling-")
    try:
        config = load_config(None, [
            f"data.url={pipeline._data(root, count)}", f"output={root}/runs", "backbone.spec=effnet-lite0",
            f"backbone.image_size={image_size}", "index.shots=[1]", "index.seeds=[0]",
            f"evaluate.batch_size={batch_size}", "evaluate.shard_size=64", f"evaluate.num_actors={actors}",
            "device=cpu", "tracking.enabled=false",
        ])
        init_ray()
        run_index(config)
        with scan.WorkerMemory() as workers:
            start = time.perf_counter()
            (result,) = run_evaluate(config, progress=False)
            seconds = time.perf_counter() - start
        images = result.counts["images"]
        return {"images": images, "seconds": round(seconds, 1),
                "ms_per_image": round(1000 * seconds / images, 1),
                "images_per_s": round(images / seconds, 1),
                "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "driver_peak_anon_mb": round(workers.driver_anon_mb),
                "driver_peak_shmem_mb": round(workers.driver_shmem_mb),
                "worker_peak_rss_mb": round(workers.peak_mb),
                "worker_peak_anon_mb": round(workers.peak_anon_mb),
                "worker_peak_shmem_mb": round(workers.peak_shmem_mb)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def images_table(args) -> None:
    print(f"load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for count in args.counts:
        out = subprocess.run([sys.executable, __file__, "_one", str(count),
                              "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                              "--actors", str(args.actors)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n`evaluate`, baseline k=1, {args.image_size} px, batch {args.batch_size}, {args.actors} actors")
    print("Peaks in MiB; private = RssAnon, shared = RssShmem (Ray object store pages mapped in), "
          "each its own peak")
    print("| test images | seconds | ms / image | images/s | driver peak RSS | driver private "
          "| driver shared | largest worker RSS | worker private | worker shared |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']:,} | {r['seconds']} | {r['ms_per_image']} | {r['images_per_s']} | "
              f"{r['driver_peak_rss_mb']} | {r['driver_peak_anon_mb']} | {r['driver_peak_shmem_mb']} | "
              f"{r['worker_peak_rss_mb']} | {r['worker_peak_anon_mb']} | {r['worker_peak_shmem_mb']} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def shots_table(args) -> None:
    import torch

    from residual_core.backbones import create_backbone
    from residual_core.bank import build_bank
    from residual_core.images import decode_image, image_to_tensor
    from residual_core.methods import create_method
    from tests.workflows.pipelines.tiny_data import tiny_rows

    pipeline = _sibling("pipeline")
    print(f"load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
    rows = [r for r in tiny_rows(n_train=max(args.shots), n_normal=args.batch_size // 2,
                                 n_anomalous=args.batch_size - args.batch_size // 2)
            if r["category"] == "brick"]
    lines = []
    for size in args.sizes:
        torch.manual_seed(0)
        backbone = create_backbone("effnet-lite0", image_size=size).eval()

        def tensors(split, backbone=backbone, size=size):
            return torch.stack([image_to_tensor(decode_image(r["image"]), size, backbone.mean, backbone.std)
                                for r in rows if r["split"] == split])

        images, references = tensors("test"), tensors("train")
        bare = pipeline._rate(backbone.forward_features, images, args.batch_size, "cpu", args.repeats,
                              threads=1)
        lines.append((size, "bare forward", "", bare, 1.0, None))
        for k in args.shots:
            bank = build_bank(backbone, references[:k], image_ids=[f"r{i}" for i in range(k)], dataset="tiny",
                              category="brick", seed=0)
            method = create_method("baseline", backbone).eval()
            rate = pipeline._rate(lambda batch, m=method, b=bank: m.score(batch, b), images, args.batch_size,
                                  "cpu", args.repeats, threads=1)
            timer = pipeline._components(method, "baseline", "cpu")
            saved = torch.get_num_threads()
            torch.set_num_threads(1)
            with torch.no_grad():
                method.score(images, bank)
            torch.set_num_threads(saved)
            timer.restore()
            matching = next(v for key, v in timer.seconds.items() if key.startswith("matching"))
            vectors = sum(int(f.shape[0]) for f in bank.features)
            lines.append((size, k, vectors, rate, rate / bare, 1000 * matching / len(images)))
            print(lines[-1], flush=True)
    print(f"\nin-memory `method.score`, baseline, 1 torch thread, batch {args.batch_size}, "
          f"best of {args.repeats}")
    print("| size | k | bank vectors (all levels) | images/s | share of bare forward | matching ms / image |")
    print("|---:|---|---:|---:|---:|---:|")
    for size, k, vectors, rate, share, matching in lines:
        print(f"| {size} | {k} | {vectors if vectors != '' else ''} | {rate:.2f} | {100 * share:.0f}% | "
              f"{'' if matching is None else f'{matching:.1f}'} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    images = sub.add_parser("images")
    images.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10000])
    shots = sub.add_parser("shots")
    shots.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    shots.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    shots.add_argument("--repeats", type=int, default=2)
    one = sub.add_parser("_one")
    one.add_argument("count", type=int)
    for p in (images, one):
        p.add_argument("--image-size", type=int, default=128)
        p.add_argument("--actors", type=int, default=2)
    for p in (images, shots, one):
        p.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.what == "_one":
        print(json.dumps(one_count(args.count, args.image_size, args.batch_size, args.actors)))
    elif args.what == "images":
        images_table(args)
    else:
        shots_table(args)


if __name__ == "__main__":
    main()
