"""`make demo`: build the small offline benchmark into `.demo/`, run leave-one-dataset-out over it with
the offline EfficientNet-Lite0 backbone for Res2CLIP (visual branch), ResAD++ and the 1-NN baseline at
k in {1, 2, 4}, print the summary table and the command that opens the MLflow UI.

To stay under ~15 minutes on a 2-core machine the demo uses one seed, 96 px images, at most 16 images per
auxiliary category and Res2CLIP's FAISS candidate path for matching (same strategy, `sparse_radial_knn`).
Its trained methods are gradient-trained, on CPU budgets: ResAD++ with the CPU training preset
(`preset: cpu`: lr 1e-3, 8 epochs; docs/methods/resadpp.md, "Presets"), Res2CLIP's visual adapters for
10 epochs. The rows are seed 0 of the three-seed table in benchmarks/RESULTS.md (issue 15), which says
what training does to them (Res2CLIP's fine-tuned rows vary from run to run by up to ~1 point). The full
protocol's defaults (3 seeds, the authors' epochs and learning rates) are what `residual-ad lodo` runs
without these overrides.
"""

from __future__ import annotations

import os
import sys
import time

DEMO_DIR = ".demo"
DEMO_OVERRIDES = [
    f"output={DEMO_DIR}/runs",
    f"data.url={DEMO_DIR}/bench",
    "backbone.spec=effnet-lite0",
    "backbone.image_size=96",
    "index.shots=[1,2,4]",
    "index.seeds=[0]",
    "train.max_images_per_category=16",
    "evaluate.batch_size=10",
    "evaluate.shard_size=32",
    "evaluate.num_actors=2",
    "evaluate.save_maps=sample",
    "tracking.experiment=residual-ad-demo",
    "lodo.methods=[{name: baseline}, "
    "{name: res2clip, params: {mode: finetune, branches: [visual], train: {epochs: 10}}}, "
    "{name: resadpp, params: {preset: cpu}}]",
]


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import main as cli

    extra = list(argv if argv is not None else sys.argv[1:])  # e.g. --set index.seeds=[0,1,2]
    started = time.monotonic()
    bench_url = f"{DEMO_DIR}/bench"
    if not os.path.exists(os.path.join(bench_url, "_manifest.json")):
        print(f"[demo] building the small offline benchmark into {bench_url} ...", flush=True)
        code = cli(["build-bench", bench_url, "--scale", "small", "--seed", "0"])
        if code:
            return code
    print("[demo] leave-one-dataset-out: baseline, res2clip (visual), resadpp; k = 1, 2, 4", flush=True)
    code = cli(["lodo", *[f"--set={item}" for item in DEMO_OVERRIDES], *extra])
    if code:
        return code
    from workflows.tracking import tracking_uri

    minutes = (time.monotonic() - started) / 60
    print(f"[demo] done in {minutes:.1f} min. Results: {DEMO_DIR}/runs/lodo/*/summary.md")
    print(f"[demo] open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
