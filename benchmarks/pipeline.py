"""Evaluate-pipeline throughput vs the bare backbone forward on the same images and batch size.

Prints images/s of (a) `backbone.forward_features` alone on preprocessed tensors already in memory,
(b) the full `evaluate` pipeline (Parquet read, decode, preprocess, forward, 1-NN baseline scoring,
metric accumulation, shard commits) with 1 and with 2 actors, and the ratio (b)/(a).
Reference banks are built before timing. Usage:
    .venv/bin/python benchmarks/pipeline.py --images 256 --batch-size 16 --image-size 224

`--method-only` skips Ray and the pipeline: in-memory `method.score` vs the bare forward at 1 torch
thread for k reference shots (`--shots 1 4`), the baseline also with the dense matching it used before
the blocked exact search, and where each method's time goes (backbone, matching, VQ, EFDM, flows, ...):
    .venv/bin/python benchmarks/pipeline.py --method-only --shots 1 4 --methods baseline res2clip resadpp
`--op-profile` adds torch.profiler's busiest operators of one batch per method and k (self CPU and device
time, call counts: a launch-bound GPU batch shows many calls of cheap kernels). `--actor-profile` times one
scoring actor in process: decode, scoring (and within it the background reduction), state and commit.
Res2CLIP on a CLIP ViT (random weights, at its native size; all three branches):
    .venv/bin/python benchmarks/pipeline.py --method-only --backbone openclip-random:ViT-B-16 \
        --methods res2clip --image-size 224
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

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
                  threads: int | None = None, with_method: bool = False,
                  limit: int | None = None) -> tuple[float, int]:
    """Images/s of the backbone alone on the same (preprocessed, in-memory) test images (the first
    `limit` of them when given); with `with_method`, of the whole `method.score` (forward + matching +
    maps) against one bank."""
    import torch

    from residual_core.images import decode_image, image_to_tensor
    from workflows.datasets.reader import read_table
    from workflows.pipelines.models import backbone_info, create_backbone_from_config

    backbone = create_backbone_from_config({"spec": config.backbone.spec, "layers": None,
                                            "image_size": config.backbone.image_size}, device).eval()
    info = backbone_info(backbone)
    table = read_table(config.data.url, columns=["image"], filters=[("split", "==", "test")])
    encoded = table.column("image").to_pylist()[:limit]
    images = torch.stack([image_to_tensor(decode_image(b), info.image_size, info.mean, info.std)
                          for b in encoded]).to(device)
    step = backbone.forward_features
    if with_method:
        step = _method_step(config, backbone, device)
    return _rate(step, images, batch_size, device, repeats, threads), len(images)


def _rate(step, images, batch_size: int, device: str, repeats: int, threads: int | None = None) -> float:
    """Images/s of `step(batch)` over `images` in batches (best of `repeats`, after one warm-up batch)."""
    import torch

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
    return len(images) / best


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


def _dense_nearest_residual_norm(query, reference, *, chunk: int = 4096, shape=None):
    """The baseline's matching before the blocked exact search: [chunk, N] similarities, then argmax."""
    import torch

    out = torch.empty(query.shape[0], dtype=query.dtype, device=query.device)
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk]
        out[start:start + chunk] = (q - reference[(q @ reference.T).argmax(dim=1)]).norm(dim=1)
    return out


def _dense_nearest(query, reference, *, block_bytes=None, **_):
    """knn.nearest as the engine's dense path computed it: [rows, N] score blocks of 2^24, argmax."""
    import torch

    step = max(1, (1 << 24) // reference.shape[0])
    rows = query.reshape(-1, query.shape[-1])
    nearest = torch.cat([(rows[i:i + step] @ reference.T).argmax(dim=-1) for i in range(0, len(rows), step)])
    values = (rows * reference[nearest]).sum(dim=-1)
    return values.reshape(query.shape[:-1]), nearest.reshape(query.shape[:-1])


class _ComponentTimer:
    """Wall time per named component: wraps callables (module functions or instance attributes), summed
    over every call in any thread. `device`: a CUDA device is synchronised before and after each call
    (its kernels counted where they were launched); None times wall clock only (calls on a background
    thread, whose overlap with the launching thread is what is measured)."""

    def __init__(self, device: str | None) -> None:
        self.device, self.seconds, self._undo = device, {}, []

    def wrap(self, owner, name: str, label: str) -> None:
        import torch

        original = getattr(owner, name)
        self.seconds.setdefault(label, 0.0)
        synchronise = self.device is not None and self.device.startswith("cuda")

        def timed(*args, **kwargs):
            if synchronise:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if synchronise:
                torch.cuda.synchronize()
            self.seconds[label] += time.perf_counter() - start
            return out

        had_own = name in getattr(owner, "__dict__", {})
        setattr(owner, name, timed)
        self._undo.append((owner, name, original, had_own))

    def restore(self) -> None:
        for owner, name, original, had_own in reversed(self._undo):
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def _components(method, name: str, device: str) -> _ComponentTimer:
    """Wrap the parts of `method.score` worth naming (the rest is reported as 'other')."""
    timer = _ComponentTimer(device)
    timer.wrap(method.backbone, "forward_features", "backbone forward")
    if name == "baseline":
        from residual_core.methods import baseline

        timer.wrap(baseline, "nearest_residual_norm", "matching (1-NN + residual norm)")
    elif name == "res2clip":
        from residual_core.methods.res2clip import method as res2clip_module

        timer.wrap(res2clip_module, "match_bank_layer", "matching (strategy engine)")
    elif name == "resadpp":
        from residual_core.methods.resadpp import method as resadpp_module

        timer.wrap(resadpp_module, "residual_maps", "matching + residuals")
        timer.wrap(method.vq, "quantize", "VQ (nearest code)")
        timer.wrap(resadpp_module, "match_feature_distribution", "EFDM")
        timer.wrap(method.constraintor, "forward", "constraintor")
        timer.wrap(method, "_flow_logps", "flows")
    return timer


def _method_only(args, device: str) -> None:
    """In-memory method.score vs bare forward (1 thread), per shot count; component times per batch."""

    import torch

    from residual_core import faiss_index
    from residual_core.backbones import create_backbone
    from residual_core.bank import build_bank
    from residual_core.images import decode_image, image_to_tensor
    from residual_core.matching import knn
    from residual_core.methods import baseline, create_method
    from tests.workflows.pipelines.tiny_data import tiny_rows

    torch.manual_seed(0)
    on_gpu = device.startswith("cuda")
    spec = _backbone_spec(args.backbone)
    backbone = create_backbone(spec, image_size=args.image_size, device=device).eval()
    count = args.batch_size * args.method_batches
    rows = [r for r in tiny_rows(n_train=max(args.shots), n_normal=count - count // 2,
                                 n_anomalous=count // 2) if r["category"] == "brick"]

    def tensors(split):
        return torch.stack([image_to_tensor(decode_image(r["image"]), args.image_size, backbone.mean,
                                            backbone.std) for r in rows if r["split"] == split]).to(device)

    images, references = tensors("test"), tensors("train")
    load = os.getloadavg()
    print(f"device={device} backbone={args.backbone} images={len(images)} batch={args.batch_size} "
          f"size={args.image_size}px torch threads=1 load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    bare = _rate(backbone.forward_features, images, args.batch_size, device, args.repeats, threads=1)
    print(f"bare forward_features: {bare:.2f} images/s")
    table, profiles = [], []
    for shots in args.shots:
        bank = build_bank(backbone, references[:shots], image_ids=[f"ref{i}" for i in range(shots)],
                          dataset="tiny", category="brick", seed=0)
        for name in args.methods:
            method = create_method(name, backbone).to(device).eval()
            torch_kernel = ("exact search, torch kernel", lambda: _patched(
                knn, "nearest", functools.partial(knn.nearest, backend="torch")))
            if name == "baseline" and not on_gpu:  # "auto": FAISS's flat search (the torch kernel on cuda)
                variants = [("exact search (auto: FAISS on CPU)", contextlib.nullcontext), torch_kernel]
            elif name == "baseline":
                variants = [torch_kernel]
            else:  # ResAD's matching asks for the torch kernel itself (first-index ties)
                variants = [("exact search, torch kernel", contextlib.nullcontext)]
            if name == "res2clip":  # its own matching engine (strategy from the config), no "before"
                variants = [("strategy engine (auto)", contextlib.nullcontext)]
                if not on_gpu or faiss_index.gpu_available():  # CPU FAISS on cuda tensors: copies, minutes
                    faiss_path = replace(method.config, match_path="faiss")
                    variants.append(("FAISS candidates + exact re-rank (match_path: faiss)",
                                     lambda m=method, c=faiss_path: _patched(m, "config", c)))
            elif name == "baseline":
                variants.append(("dense (before)", lambda: _patched(baseline, "nearest_residual_norm",
                                                                    _dense_nearest_residual_norm)))
            else:  # ResAD's matching went through the engine's dense [rows, N] blocks of 2^24 scores
                variants.append(("dense (before)", lambda: _patched(knn, "nearest", _dense_nearest)))
            for variant, context in variants:
                with context():
                    rate = _rate(lambda batch, m=method, b=bank: m.score(batch, b), images, args.batch_size,
                                 device, args.repeats, threads=1)
                    timer = _components(method, name, device)
                    saved = torch.get_num_threads()
                    torch.set_num_threads(1)
                    start = time.perf_counter()
                    with torch.no_grad():
                        for i in range(0, len(images), args.batch_size):
                            method.score(images[i:i + args.batch_size], bank)
                    total = time.perf_counter() - start
                    torch.set_num_threads(saved)
                    timer.restore()
                batches = -(-len(images) // args.batch_size)
                table.append((name, shots, variant, rate, rate / bare))
                profiles.append((name, shots, variant, total / batches,
                                 {k: v / batches for k, v in timer.seconds.items()}))
                print(f"[{name} k={shots} {variant}] {rate:.2f} images/s ({100 * rate / bare:.0f}% of bare)",
                      flush=True)
            if args.op_profile:
                _op_profile(method, bank, images[:args.batch_size], f"{name} k={shots}")
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("\n| method | k | matching | method.score images/s | share of bare forward |")
    print("|---|---:|---|---:|---:|")
    print(f"| bare `forward_features` | | | {bare:.2f} | 100% |")
    for name, shots, variant, rate, share in table:
        print(f"| {name} | {shots} | {variant} | {rate:.2f} | {100 * share:.0f}% |")
    print(f"\nSeconds per batch of {args.batch_size} (one timed pass; components as wrapped):")
    for name, shots, variant, total, parts in profiles:
        other = total - sum(parts.values())
        shares = ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in parts.items())
        print(f"- {name} k={shots} {variant}: total {total:.3f} s: {shares}, other {other:.3f} s "
              f"({100 * other / total:.0f}%)")


OP_PROFILE_ROWS = 15


def _op_profile(method, bank, batch, label: str) -> None:
    """torch.profiler over one `method.score` batch (after a warm-up one): the operators that take the
    most time on the batch's device (self time), with their call counts: where a GPU batch's time goes
    (launch-bound runs show many calls of cheap kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = batch.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.no_grad():
        method.score(batch, bank)
        with profile(activities=activities) as prof:
            method.score(batch, bank)
            if on_gpu:
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(f"\n[op profile {label}, one batch of {len(batch)}]")
    table = prof.key_averages().table(sort_by=key, row_limit=OP_PROFILE_ROWS, max_name_column_width=48)
    print(table, flush=True)


RANDOM_OPENCLIP = "openclip-random:"  # e.g. openclip-random:ViT-B-16: random weights, no download


def _backbone_spec(spec: str) -> str:
    """A backbone spec; `openclip-random:<arch>` saves a randomly initialised open_clip model to a temporary
    file and loads it through the checkpoint path users use (no pretrained CLIP weights offline)."""
    if not spec.startswith(RANDOM_OPENCLIP):
        return spec
    import open_clip
    import torch
    from safetensors.torch import save_file

    arch = spec[len(RANDOM_OPENCLIP):]
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path = os.path.join(tempfile.mkdtemp(prefix="bench-openclip-"), f"{arch}.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return f"openclip:{arch}@{path}"


@contextlib.contextmanager
def _patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _fresh_output(config, name: str):
    """`config` writing to its own output folder `<output>-<name>`, with the banks already built there
    (copied: building them is not timed)."""
    fresh = replace(config, output=f"{config.output}-{name}")
    shutil.copytree(f"{config.output}/indexes", f"{fresh.output}/indexes")
    return fresh


def _pipeline(config, actors: int, calls: int = 1) -> tuple[float, float, float]:
    """The evaluate pipeline (fresh output, banks prebuilt): (images/s overall, actor start-up included;
    seconds until the first shard was scored and committed; images/s once every actor has delivered a
    shard, to the last shard: the steady state that a long run approaches)."""
    import json

    from workflows.pipelines import evaluate

    config = _fresh_output(replace(config, evaluate=replace(config.evaluate, num_actors=actors)),
                           f"{actors}-actors-{calls}-calls-{config.evaluate.shard_size}")
    finished = []  # (seconds since start, images) per shard, as the pipeline yields them
    run_scoring = evaluate.run_scoring

    def timed_scoring(*args, **kwargs):
        for row in run_scoring(*args, **kwargs):
            finished.append((time.perf_counter() - start, json.loads(row["summary"])["images"]))
            yield row

    start = time.perf_counter()
    with _patched(evaluate, "run_scoring", timed_scoring):
        (result,) = evaluate.run_evaluate(config, progress=False)
    overall = result.counts["images"] / (time.perf_counter() - start)
    # steady state: from the time every actor has delivered its first shard (the shards before that were
    # scored in parallel from the start) to the last shard
    warm = min(actors, len(finished)) - 1
    later = sum(images for _, images in finished[warm + 1:])
    span = finished[-1][0] - finished[warm][0]
    steady = later / span if span > 0 else float("nan")
    # the timeline behind both figures: a steady state over a few shards is only as good as their spacing
    print(f"  {actors} actor(s): shards done at (s: images) "
          + ", ".join(f"{seconds:.1f}: {images}" for seconds, images in finished), flush=True)
    return overall, finished[0][0], steady


def _gpu_share(device: str, actors: int) -> float | None:
    """On cuda, each actor's GPU share: the GPUs split between the actors, at most one each (two actors
    on one GPU: two processes, each with its own background reduction); None (the config's) elsewhere."""
    import torch

    return min(1.0, torch.cuda.device_count() / actors) if device.startswith("cuda") else None


def _actor_profile(config) -> dict[str, float]:
    """Seconds per image of one scoring actor's work, in process and one shard after another (no Ray):
    decoding (`prepare_shard`, a CPU task in the pipeline), scoring (`ScoringActor.score_shard`: forward,
    matching, the batches' metric reduction) and the rest of the call (the shard's metric state, results
    and commit), after a first shard that loads the models (not counted); and inside scoring, the time
    the background thread spent reducing batches (overlapped with scoring), with its parts (wall time: on
    a GPU the device parts include their waits for the queued kernels)."""
    import json

    from residual_core.metrics import accumulator
    from residual_core.metrics.device_fold import DeviceFold
    from workflows.pipelines import evaluate
    from workflows.pipelines.scoring import ScoringActor, prepare_shard
    from workflows.pipelines.shard_outputs import ShardOutputs

    fresh = _fresh_output(config, "actor-profile")
    actor, seconds, images = ScoringActor(batch_size=config.evaluate.batch_size), [], 0
    reductions = _ComponentTimer(None)  # inside scoring: the batches' reduction and its parts
    real_score = actor.score_shard
    scoring = []

    def timed_score(*args, **kwargs):
        start = time.perf_counter()
        real_score(*args, **kwargs)
        scoring.append(time.perf_counter() - start)

    actor.score_shard = timed_score

    def in_process(tasks, **_):
        nonlocal images
        for number, (job, shard) in enumerate(tasks):
            item = {"job": job.to_json(), "shard": json.dumps(shard.to_dict())}
            start = time.perf_counter()
            row = prepare_shard(item)
            prepared = time.perf_counter()
            summary = actor(row)
            done = time.perf_counter()
            if not number:  # the first shard loads the models: not counted
                reductions.seconds = dict.fromkeys(reductions.seconds, 0.0)
            else:
                seconds.append((prepared - start, scoring[-1], done - prepared - scoring[-1]))
                images += json.loads(summary["summary"])["images"]
            yield summary

    reductions.wrap(ShardOutputs, "add", "reduction (background thread)")
    reductions.wrap(accumulator.MetricAccumulator, "_update_pixels", "  pixel updates")
    reductions.wrap(accumulator, "anomalous_pixel_regions", "    mask regions (CPU)")
    reductions.wrap(accumulator, "reduce_torch_bins", "    device reduction")
    reductions.wrap(DeviceFold, "add", "    device fold")
    try:
        with _patched(evaluate, "run_scoring", in_process):
            evaluate.run_evaluate(fresh, progress=False)
    finally:
        reductions.restore()
    totals = [sum(part) / max(images, 1) for part in zip(*seconds, strict=True)]
    parts = dict(zip(("decode", "score", "state and commit"), totals, strict=True))
    return parts | {name: value / max(images, 1) for name, value in reductions.seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--shard-size", type=int, nargs="+", default=[64],
                        help="images per shard; several: one evaluate run per size (the first for the rest)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpus", type=int, default=None)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2],
                        help="evaluate pipeline runs with these actor counts (on cuda the GPUs are split "
                             "between them, at most one each: 2 on one GPU get 0.5 each)")
    parser.add_argument("--bare-images", type=int, default=None,
                        help="time the bare forward and in-memory rows on the first N test images (all)")
    parser.add_argument("--gpu-calls", type=int, nargs="+", default=None,
                        help="on cuda: evaluate runs with these shard calls at once per GPU actor "
                             "(default: scoring.CALLS_PER_GPU_ACTOR)")
    parser.add_argument("--actor-profile", action="store_true",
                        help="also time one scoring actor in process (decode, score, state and commit)")
    parser.add_argument("--method-only", action="store_true",
                        help="in-memory method.score vs bare forward only (no Ray, no pipeline)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4], help="--method-only: bank shots")
    parser.add_argument("--methods", nargs="+", default=["baseline"], help="--method-only: methods")
    parser.add_argument("--method-batches", type=int, default=1, help="--method-only: batches timed")
    parser.add_argument("--repeats", type=int, default=3, help="--method-only: best of")
    parser.add_argument("--op-profile", action="store_true",
                        help="--method-only: torch.profiler's busiest operators, one batch per method and k")
    parser.add_argument("--backbone", default="effnet-lite0",
                        help="--method-only: backbone spec, or openclip-random:<arch> (random weights)")
    args = parser.parse_args()

    from workflows.config import load_config
    from workflows.pipelines import scoring
    from workflows.pipelines.index import run_index
    from workflows.pipelines.ray_runtime import init_ray, resolve_device

    device = resolve_device(args.device)  # on a GPU: full float32, as the pipelines compute
    args.gpu_calls = args.gpu_calls or [scoring.CALLS_PER_GPU_ACTOR]
    if args.method_only:
        _method_only(args, device)
        return
    root = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        data = _data(root, args.images)
        config = load_config(None, [
            f"data.url={data}", f"output={root}/runs", "backbone.spec=effnet-lite0",
            f"backbone.image_size={args.image_size}", "index.shots=[1]", "index.seeds=[0]",
            f"evaluate.batch_size={args.batch_size}", f"evaluate.shard_size={args.shard_size[0]}",
            f"device={device}", "tracking.enabled=false",
        ])
        init_ray(num_cpus=args.cpus)
        run_index(config)
        bare, count = _bare_forward(config, args.batch_size, device, repeats=3, limit=args.bare_images)
        load = os.getloadavg()
        print(f"device={device} bare/in-memory images={count} batch={args.batch_size} "
              f"size={args.image_size}px shard={args.shard_size[0]} cpus={args.cpus or os.cpu_count()} "
              f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        print(f"bare backbone forward      : {bare:8.1f} images/s")
        one_thread, _ = _bare_forward(config, args.batch_size, device, repeats=3, threads=1,
                                      limit=args.bare_images)
        method_rate, _ = _bare_forward(config, args.batch_size, device, repeats=3, threads=1,
                                       with_method=True, limit=args.bare_images)
        print(f"  same, 1 thread (a 1-CPU actor's share): {one_thread:8.1f} images/s")
        print(f"  in-memory method.score, 1 thread      : {method_rate:8.1f} images/s")
        if args.actor_profile:
            parts = _actor_profile(config)
            actor = parts["score"] + parts["state and commit"]
            print("one actor in process, per image: "
                  + ", ".join(f"{name.strip()} {1000 * value:.3f} ms" for name, value in parts.items())
                  + f"; scoring and commit {1 / actor:.1f} images/s ({100 / actor / bare:5.1f}% of bare)",
                  flush=True)
        runs = [(actors, calls, size) for size in args.shard_size for actors in args.actors
                for calls in (args.gpu_calls if device.startswith("cuda") else [1])]
        for actors, calls, size in runs:
            share = _gpu_share(device, actors)
            evaluate_config = replace(config.evaluate, shard_size=size, num_gpus_per_actor=share)
            sized = replace(config, evaluate=evaluate_config)
            with _patched(scoring, "CALLS_PER_GPU_ACTOR", calls):
                rate, first, steady = _pipeline(sized, actors, calls)
            label = f", {calls} call(s) at once" if device.startswith("cuda") else ""
            label += f", {share:g} GPU each" if share else ""
            label += f", shards of {size}" if len(args.shard_size) > 1 else ""
            print(f"evaluate pipeline, {actors} actor(s){label}, {args.images} images: {rate:8.1f} "
                  f"images/s ({100 * rate / bare:5.1f}% of bare); first shard after {first:.1f} s, "
                  f"steady {steady:.1f} images/s ({100 * steady / bare:5.1f}% of bare)")
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
