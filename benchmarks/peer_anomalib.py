"""Issue 17's peer comparison: `residual-ad evaluate` vs anomalib 2.7's PatchCore `Engine.predict`.

Same images (128 px PNGs, a Parquet dataset for residual-ad and a folder per category for anomalib), same
backbone architecture (EfficientNet-Lite0: residual-ad's `effnet-lite0`, anomalib's timm
`tf_efficientnet_lite0` with random weights), 224 px, batch 16. anomalib runs in its own virtual environment
(`.bench-envs/anomalib/`, created on first use; never a project dependency). Each measurement is one fresh
process: it builds its banks (untimed inside), then scores every test image (timed inside: the scoring
phase); the whole process's wall time is taken from outside. Usage:

    .venv/bin/python benchmarks/peer_anomalib.py [--images 320] [--shots 4] [--rounds 3] [--max-load 3]

Every measurement runs `--rounds` times, the tools alternating; the table gives the best round (the least
disturbed on a shared machine) and the median. Figures: benchmarks/RESULTS.md (issue 17 section).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER_ENV = os.path.join(ROOT, ".bench-envs", "anomalib")
PEER_PYTHON = os.path.join(PEER_ENV, "bin", "python")
# torch as the Makefile installs it (from local disk), then the peer; nothing else needed pinning
PEER_INSTALL = (["torch==2.14.1", "torchvision==0.29.1"], ["anomalib==2.7.0"])
PEER_ARCH = "tf_efficientnet_lite0"
# timm feature names of tf_efficientnet_lite0 at strides 8 and 16 (40 and 112 channels): the same blocks as
# residual-ad's effnet-lite0 levels 2 and 3 (EFFNET_DEFAULT_LAYERS (1, 2, 3) = strides 4, 8, 16)
PEER_LAYERS = ("blocks.2", "blocks.4")
SAME_LEVELS = "2,3"
EVALUATE_SAME = "residual-ad `evaluate`, baseline, levels (2, 3) = stride 8/16"
IMAGE_SIZE, BATCH, ACTORS = 224, 16, 2
PNG_SIZE = 128
# PatchCore keeps the whole few-shot bank, as residual-ad's baseline does. anomalib's greedy k-center at ratio
# 1.0 selects every vector (a reordering; ~40 s per 3,136-vector bank here), so that selection is skipped.
CORESET_RATIO = 1.0
LOAD_POLL_S, LOAD_WAIT_MAX_S = 15, 900


def ensure_peer_env() -> None:
    """Create the anomalib environment unless it already imports anomalib."""
    if os.path.exists(PEER_PYTHON) and subprocess.run(
            [PEER_PYTHON, "-c", "import anomalib"], capture_output=True).returncode == 0:
        return
    print(f"creating {PEER_ENV} (torch from local disk, then anomalib)", flush=True)
    subprocess.run([_base_python(), "-m", "venv", PEER_ENV], check=True)
    for packages in PEER_INSTALL:
        subprocess.run([PEER_PYTHON, "-m", "pip", "install", "-q", *packages], check=True)


def _base_python() -> str:
    """The interpreter the project's venv was made from (the same Python version for the peer)."""
    return os.path.join(sys.base_prefix, "bin", "python3")


def write_images(root: str, images: int, shots: int) -> tuple[str, str]:
    """The test images and k normal train images per category, as a Parquet dataset and as folders
    `<dataset>_<category>/{train/good,test/good,test/defect}/<i>.png`. Returns (parquet url, folder root)."""
    sys.path.insert(0, ROOT)
    from tests.workflows.pipelines import tiny_data
    from workflows.datasets.writer import write_dataset

    tiny_data.SIZE = PNG_SIZE  # the tiny generator's crops (48 px by default), at the 128 px
    categories = sum(len(spec[1]) for spec in tiny_data.TINY_LAYOUT.values())
    per_category = max(2, images // categories)
    rows = tiny_data.tiny_rows(n_train=shots, n_normal=per_category // 2,
                               n_anomalous=per_category - per_category // 2)
    url, folders = os.path.join(root, "data"), os.path.join(root, "folders")
    write_dataset(rows, url)
    for i, row in enumerate(rows):
        kind = "good" if row["label"] == 0 else "defect"
        path = os.path.join(folders, f"{row['dataset']}_{row['category']}", row["split"], kind, f"{i}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(row["image"])
    return url, folders


def _print_result(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def _bare_rate(forward, images: int) -> float:
    """Images/s of `forward` on random [BATCH, 3, 224, 224] batches (best of 2 passes after a warm-up)."""
    import torch

    data = _random_images(images, 0)
    best = float("inf")
    with torch.no_grad():
        forward(data[:BATCH])
        for _ in range(2):
            start = time.perf_counter()
            for i in range(0, images, BATCH):
                forward(data[i:i + BATCH])
            best = min(best, time.perf_counter() - start)
    return images / best


def _random_images(count: int, seed: int):
    import torch

    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def child_bare_residual(images: int, shots: int) -> None:
    """The bare forward at levels (2, 3), and in-memory baseline `method.score` (no pipeline) against a
    k-image bank at levels (2, 3) and at the default levels; this process's torch threads."""
    sys.path.insert(0, ROOT)
    from residual_core.backbones import create_backbone
    from residual_core.bank import build_bank
    from residual_core.methods import create_method

    rates = {}
    for name, levels in (("same", (2, 3)), ("default", None)):
        backbone = create_backbone("effnet-lite0", layers=levels, image_size=IMAGE_SIZE).eval()
        if name == "same":
            rates["rate"] = _bare_rate(backbone.forward_features, images)
        bank = build_bank(backbone, _random_images(shots, 1), image_ids=[str(i) for i in range(shots)],
                          dataset="bench", category="random", seed=0)
        method = create_method("baseline", backbone).eval()
        rates[f"score_{name}"] = _bare_rate(lambda batch, m=method, b=bank: m.score(batch, b), images)
    _print_result(**rates)


def child_bare_peer(images: int, shots: int) -> None:
    """The bare TimmFeatureExtractor forward, and in-memory `PatchcoreModel` scoring (forward, 3x3 pooling,
    1-NN against the k-image bank, image score, upsampled and blurred map; no Lightning) in eval mode."""
    import torch
    from anomalib.models.components import TimmFeatureExtractor
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    extractor = TimmFeatureExtractor(PEER_ARCH, layers=list(PEER_LAYERS), pre_trained=False).eval()
    rate = _bare_rate(extractor, images)
    model = PatchcoreModel(layers=PEER_LAYERS, backbone=PEER_ARCH, pre_trained=False).train()
    with torch.no_grad():
        model(_random_images(shots, 1))
    model.memory_bank = torch.vstack(model.embedding_store)  # the whole bank (coreset ratio 1.0)
    model.embedding_store.clear()
    _print_result(rate=rate, score_same=_bare_rate(model.eval(), images))


def child_residual(data: str, output: str, shots: int, levels: str) -> None:
    """run_index (banks, untimed) then run_evaluate (timed): the baseline at k=`shots`, 2 actors."""
    sys.path.insert(0, ROOT)
    from workflows.config import load_config
    from workflows.pipelines.evaluate import run_evaluate
    from workflows.pipelines.index import run_index
    from workflows.pipelines.ray_runtime import init_ray

    layers = [] if levels == "default" else [f"backbone.layers=[{levels}]"]
    config = load_config(None, [
        f"data.url={data}", f"output={output}", "backbone.spec=effnet-lite0", *layers,
        f"backbone.image_size={IMAGE_SIZE}", f"index.shots=[{shots}]", "index.seeds=[0]",
        "method.name=baseline", f"evaluate.batch_size={BATCH}", f"evaluate.num_actors={ACTORS}",
        "device=cpu", "tracking.enabled=false"])
    init_ray()
    start = time.perf_counter()
    run_index(config)
    bank_s = time.perf_counter() - start
    start = time.perf_counter()
    (result,) = run_evaluate(config, progress=False)
    _print_result(images=result.counts["images"], bank_s=bank_s, score_s=time.perf_counter() - start)


def child_peer(folders: str, output: str, visualizer: bool) -> None:
    """Per category: Engine.fit on its k normal train images (untimed inside), Engine.predict on its test
    images (timed), batch 16, 224 px, CPU, no data-loader workers."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from anomalib.data import PredictDataset
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore import torch_model
    from torch.utils.data import DataLoader

    class WholeBank(torch_model.KCenterGreedy):
        def sample_coreset(self, *args, **kwargs):
            whole = self.coreset_size >= self.n_observations
            return self.embedding if whole else super().sample_coreset(*args, **kwargs)

    torch_model.KCenterGreedy = WholeBank

    def loader(path):
        dataset = PredictDataset(path)
        return DataLoader(dataset, batch_size=BATCH, collate_fn=dataset.collate_fn, num_workers=0)

    images, bank_s, score_s = 0, 0.0, 0.0
    for category in sorted(os.listdir(folders)):
        pre_processor = Patchcore.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE))
        model = Patchcore(backbone=PEER_ARCH, layers=PEER_LAYERS, pre_trained=False,
                          pre_processor=pre_processor, coreset_sampling_ratio=CORESET_RATIO,
                          visualizer=visualizer)
        engine = Engine(logger=False, default_root_dir=os.path.join(output, category), accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
        start = time.perf_counter()
        engine.fit(model, train_dataloaders=loader(os.path.join(folders, category, "train")))
        bank_s += time.perf_counter() - start
        test = loader(os.path.join(folders, category, "test"))
        start = time.perf_counter()
        predictions = engine.predict(model, dataloaders=test, return_predictions=True)
        score_s += time.perf_counter() - start
        images += sum(len(batch.pred_score) for batch in predictions)
    written = sum(len(files) for _, _, files in os.walk(output))
    _print_result(images=images, bank_s=bank_s, score_s=score_s, files_written=written,
                  bank_vectors=int(model.model.memory_bank.shape[0]))


def run_child(python: str, *args: str) -> dict:
    """Run this script's child mode in a fresh process; its RESULT line plus the whole-process wall time."""
    start = time.perf_counter()
    done = subprocess.run([python, os.path.abspath(__file__), "--child", *args], capture_output=True,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"child {args} failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
                         f"\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


def wait_for_load(max_load: float) -> None:
    waited = 0
    while os.getloadavg()[0] >= max_load and waited < LOAD_WAIT_MAX_S:
        print(f"1-minute load {os.getloadavg()[0]:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(LOAD_POLL_S)
        waited += LOAD_POLL_S


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _versions() -> str:
    code = ("import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
            "('anomalib', 'lightning', 'timm', 'torch')))")
    return subprocess.run([PEER_PYTHON, "-c", code], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="test images (split over 5 categories)")
    parser.add_argument("--shots", type=int, default=4, help="k normal reference images per category")
    parser.add_argument("--bare-images", type=int, default=160, help="images of the bare forward timing")
    parser.add_argument("--max-load", type=float, default=3.0, help="wait until the 1-minute load is below")
    parser.add_argument("--rounds", type=int, default=3, help="every measurement this many times")
    parser.add_argument("--no-visualizer-row", action="store_true", help="skip anomalib with its writer on")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"bare-residual": lambda: child_bare_residual(int(rest[0]), int(rest[1])),
         "bare-peer": lambda: child_bare_peer(int(rest[0]), int(rest[1])),
         "residual": lambda: child_residual(rest[0], rest[1], int(rest[2]), rest[3]),
         "peer": lambda: child_peer(rest[0], rest[1], rest[2] == "on")}[kind]()
        return

    ensure_peer_env()
    root = tempfile.mkdtemp(prefix="bench-peer-")
    try:
        data, folders = write_images(root, args.images, args.shots)
        wait_for_load(args.max_load)
        print(f"start: {_uptime()}\npeer env: {_versions()}", flush=True)
        results: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):  # rounds alternate the tools, so load drift hits them alike
            for label, result in measure_round(args, data, folders, f"{root}/round{round_}"):
                results.setdefault(label, []).append(result)
                print(f"round {round_ + 1}: {label}: {result}", flush=True)
        print(f"end: {_uptime()}")
        print_table(results, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_round(args, data: str, folders: str, root: str) -> list[tuple[str, dict]]:
    """Every measurement once, each in a fresh process: [(label, {"rate": scoring images/s, ...})]."""
    ours = run_child(sys.executable, "bare-residual", str(args.bare_images), str(args.shots))
    peer = run_child(PEER_PYTHON, "bare-peer", str(args.bare_images), str(args.shots))
    rows = [(label, {"rate": rate}) for label, rate in (
        ("bare `forward_features`, residual-ad effnet-lite0, levels (2, 3)", ours["rate"]),
        (f"bare forward, anomalib TimmFeatureExtractor {PEER_ARCH} {PEER_LAYERS}", peer["rate"]),
        ("in-memory baseline `method.score`, levels (2, 3)", ours["score_same"]),
        ("in-memory baseline `method.score`, default levels (1, 2, 3)", ours["score_default"]),
        ("in-memory anomalib `PatchcoreModel` (eval forward, no Lightning)", peer["score_same"]))]
    runs = [(EVALUATE_SAME, sys.executable,
             ["residual", data, f"{root}/runs-same", str(args.shots), SAME_LEVELS]),
            ("anomalib PatchCore `Engine.predict`, visualizer off", PEER_PYTHON,
             ["peer", folders, f"{root}/peer-off", "off"]),
            ("residual-ad `evaluate`, baseline, default levels (1, 2, 3)", sys.executable,
             ["residual", data, f"{root}/runs-default", str(args.shots), "default"])]
    if not args.no_visualizer_row:
        runs.append(("anomalib PatchCore `Engine.predict`, visualizer on (writes overlays)", PEER_PYTHON,
                     ["peer", folders, f"{root}/peer-on", "on"]))
    for label, python, child_args in runs:
        r = run_child(python, *child_args)
        rows.append((label, {**r, "rate": r["images"] / r["score_s"], "whole": r["images"] / r["wall_s"]}))
    return rows


def print_table(results: dict[str, list[dict]], args) -> None:
    """The markdown table over rounds: best (the least disturbed on a shared machine) and median; ratios
    are best against best of residual-ad `evaluate` at the same (stride 8/16) levels."""
    def stat(label: str, key: str, pick) -> float:
        return pick(r[key] for r in results[label])

    same_rate, same_whole = stat(EVALUATE_SAME, "rate", max), stat(EVALUATE_SAME, "whole", max)
    print(f"\n{args.images} test images, k={args.shots}, {IMAGE_SIZE} px, batch {BATCH}, CPU; {args.rounds} "
          f"rounds; bare and in-memory rows: {args.bare_images} random tensors, best of 2 passes, the "
          "process's torch threads")
    print("| what | scoring images/s: best | median (min) | best ÷ evaluate (stride 8/16) | bank build s "
          "(median) | whole process s: best | median | best ÷ evaluate (stride 8/16) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, runs in results.items():
        best = stat(label, "rate", max)
        cells = [label, f"{best:.1f}", f"{stat(label, 'rate', statistics.median):.1f} "
                 f"({stat(label, 'rate', min):.1f})", f"{best / same_rate:.2f}"]
        if "whole" in runs[0]:
            cells += [f"{stat(label, 'bank_s', statistics.median):.1f}", f"{stat(label, 'wall_s', min):.1f}",
                      f"{stat(label, 'wall_s', statistics.median):.1f}",
                      f"{stat(label, 'whole', max) / same_whole:.2f}"]
        print("| " + " | ".join(cells + [""] * (8 - len(cells))) + " |")


if __name__ == "__main__":
    main()
