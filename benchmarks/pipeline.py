"""Evaluate-pipeline throughput vs the bare backbone forward on the same images and batch size.

Prints images/s of (a) `backbone.forward_features` alone on preprocessed tensors already in memory,
(b) the full `evaluate` pipeline (Parquet read, decode, preprocess, forward, 1-NN baseline scoring,
metric accumulation, shard commits) with 1 and with 2 actors, and the ratio (b)/(a).
Reference banks are built before timing. Usage:
    .venv/bin/python benchmarks/pipeline.py --images 256 --batch-size 16 --image-size 224
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data(root: str, images: int) -> str:
    from tests.workflows.pipelines.tiny_data import TINY_LAYOUT, tiny_rows
    from workflows.datasets.writer import write_dataset

    categories = sum(len(spec[1]) for spec in TINY_LAYOUT.values())
    per_category = max(2, images // categories)
    url = os.path.join(root, "data")
    normal = per_category // 2
    write_dataset(tiny_rows(n_train=4, n_normal=normal, n_anomalous=per_category - normal), url)
    return url


def _bare_forward(config, batch_size: int, device: str, repeats: int,
                  threads: int | None = None, with_method: bool = False) -> tuple[float, int]:
    """Images/s of the backbone alone on the same (preprocessed, in-memory) test images; with
    `with_method`, of the whole `method.score` (forward + matching + maps) against one bank."""
    import torch

    from residual_core.images import decode_image, image_to_tensor
    from workflows.datasets.reader import read_table
    from workflows.pipelines.models import backbone_info, create_backbone_from_config

    backbone = create_backbone_from_config({"spec": config.backbone.spec, "layers": None,
                                            "image_size": config.backbone.image_size}, device).eval()
    info = backbone_info(backbone)
    table = read_table(config.data.url, columns=["image"], filters=[("split", "==", "test")])
    images = torch.stack([image_to_tensor(decode_image(b), info.image_size, info.mean, info.std)
                          for b in table.column("image").to_pylist()]).to(device)
    step = backbone.forward_features
    if with_method:
        step = _method_step(config, backbone, device)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    best = float("inf")
    with torch.no_grad():
        step(images[:batch_size])  # warm-up
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(0, len(images), batch_size):
                step(images[i:i + batch_size])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    torch.set_num_threads(saved_threads)
    return len(images) / best, len(images)


def _method_step(config, backbone, device: str):
    """`method.score` of the configured method against the first committed bank (all categories'
    banks are the same size, so one stands for all)."""
    import glob

    from residual_core.bank import load_bank
    from residual_core.methods import create_method

    header = sorted(glob.glob(f"{config.output}/indexes/**/header.json", recursive=True))[0]
    bank = load_bank(os.path.dirname(header))
    method = create_method(config.method.name, backbone, **config.method.params).to(device).eval()
    return lambda batch: method.score(batch, bank)


def _pipeline(config, actors: int) -> float:
    """Images/s of the evaluate pipeline (fresh output, banks prebuilt, actor start-up included)."""
    from dataclasses import replace

    from workflows.pipelines.evaluate import run_evaluate

    fresh = replace(config, evaluate=replace(config.evaluate, num_actors=actors),
                    output=f"{config.output}-{actors}-actors")
    shutil.copytree(f"{config.output}/indexes", f"{fresh.output}/indexes")  # banks: not timed
    config = fresh
    start = time.perf_counter()
    (result,) = run_evaluate(config, progress=False)
    return result.counts["images"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpus", type=int, default=None)
    args = parser.parse_args()

    import torch

    from workflows.config import load_config
    from workflows.pipelines.index import run_index
    from workflows.pipelines.ray_runtime import init_ray

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    root = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        data = _data(root, args.images)
        config = load_config(None, [
            f"data.url={data}", f"output={root}/runs", "backbone.spec=effnet-lite0",
            f"backbone.image_size={args.image_size}", "index.shots=[1]", "index.seeds=[0]",
            f"evaluate.batch_size={args.batch_size}", f"evaluate.shard_size={args.shard_size}",
            f"device={device}", "tracking.enabled=false",
        ])
        init_ray(num_cpus=args.cpus)
        run_index(config)
        bare, count = _bare_forward(config, args.batch_size, device, repeats=3)
        print(f"device={device} images={count} batch={args.batch_size} size={args.image_size}px "
              f"shard={args.shard_size} cpus={args.cpus or os.cpu_count()}")
        print(f"bare backbone forward      : {bare:8.1f} images/s")
        one_thread, _ = _bare_forward(config, args.batch_size, device, repeats=3, threads=1)
        method_rate, _ = _bare_forward(config, args.batch_size, device, repeats=3, threads=1,
                                       with_method=True)
        print(f"  same, 1 thread (a 1-CPU actor's share): {one_thread:8.1f} images/s")
        print(f"  in-memory method.score, 1 thread      : {method_rate:8.1f} images/s")
        for actors in (1, 2):
            rate = _pipeline(config, actors)
            share = 100 * rate / bare
            print(f"evaluate pipeline, {actors} actor(s): {rate:8.1f} images/s  ({share:5.1f}% of bare)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
