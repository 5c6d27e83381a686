"""Issue 15's table: leave-one-dataset-out, every method row (trained and untrained) and the ResAD++
ablations, k = 1, 2, 4, three seeds, mean +- std over the seeds.

One `residual-ad lodo` run per row (rows of one method name would share a summary key), each in its own
process, into `--out/<row>/`; then one table of the rows' `summary.csv` files (`--out/table.md`,
`table.csv`). Rerunning skips rows whose summary exists (`--force` reruns them). A seed is a different
reference draw, training-data draw and, for trained methods, a different training (initialisation and
shuffling: `registry.seeded_params`).

    .venv/bin/python benchmarks/lodo_table.py --bench .demo/bench --out .demo/table
    .venv/bin/python benchmarks/lodo_table.py --rows baseline resadpp-cpu --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time

# the demo's data settings (workflows/demo.py): small benchmark, EfficientNet-Lite0 at 96 px, at most
# 16 images per auxiliary category and pool
COMMON = [
    "backbone.spec=effnet-lite0",
    "backbone.image_size=96",
    "index.shots=[1,2,4]",
    "train.max_images_per_category=16",
    "evaluate.batch_size=10",
    "evaluate.shard_size=32",
    "evaluate.num_actors=2",
    "evaluate.save_maps=none",
    "tracking.experiment=residual-ad-table",
]
RES2CLIP_VISUAL = "mode: {mode}, branches: [visual]"  # torch path; the 3-seed table used FAISS candidates
RESADPP_UNTRAINED = "epochs: 1, first_stage_epochs: 1, lr: 0.0"  # statistics only: no gradient step
ROWS: dict[str, tuple[str, str]] = {  # row -> (method name, params as YAML flow mapping)
    "baseline": ("baseline", ""),
    "patchcore": ("patchcore", ""),
    "res2clip-training-free": ("res2clip", RES2CLIP_VISUAL.format(mode="training-free")),
    "res2clip-finetuned": ("res2clip", RES2CLIP_VISUAL.format(mode="finetune") + ", train: {epochs: 10}"),
    "resadpp-untrained": ("resadpp", RESADPP_UNTRAINED),
    "resadpp-cpu": ("resadpp", "preset: cpu"),
    "resadpp-cpu-no-constraintor": ("resadpp", "preset: cpu, constraintor: none"),
    "resadpp-cpu-no-vq-efdm": ("resadpp", "preset: cpu, distribution_matching: false"),
    "resadpp-cpu-boundary-only": ("resadpp", "preset: cpu, score_branch: boundary"),
    "resadpp-cpu-likelihood-only": ("resadpp", "preset: cpu, score_branch: likelihood"),
}
# rows that only score differently reuse another row's trainings (same output, same checkpoint keys:
# `registry.training_params` leaves scoring-only hyper-parameters out of a training's identity)
TRAINING_OF = {"resadpp-cpu-boundary-only": "resadpp-cpu", "resadpp-cpu-likelihood-only": "resadpp-cpu"}
METRICS = ("I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO@0.3")


def run_row(row: str, bench: str, out: str, seeds: list[int], force: bool) -> dict:
    """`residual-ad lodo` for one row; returns its record (wall time, load, summary path)."""
    directory = os.path.join(out, row)
    output = os.path.join(out, TRAINING_OF.get(row, row))
    record_path = os.path.join(directory, "row.json")
    if os.path.exists(record_path) and not force:
        with open(record_path) as f:
            return json.load(f)
    name, params = ROWS[row]
    method = f"[{{name: {name}, params: {{{params}}}}}]" if params else f"[{{name: {name}}}]"
    os.makedirs(directory, exist_ok=True)
    pattern = os.path.join(output, "lodo", "*", "summary.csv")
    before = set(glob.glob(pattern))
    overrides = [*COMMON, f"output={output}", f"data.url={bench}", f"index.seeds={seeds}",
                 f"lodo.methods={method}"]
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "workflows.cli", "lodo",
                            *[f"--set={item}" for item in overrides]])
    wall = time.monotonic() - started
    summaries = sorted(set(glob.glob(pattern)) - before)
    if code or not summaries:
        raise SystemExit(f"row {row}: lodo exited {code}; no summary under {directory}")
    record = {"row": row, "method": name, "params": params, "seeds": seeds, "wall_s": round(wall, 1),
              "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
              "summary": summaries[-1]}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def _percent(value: str) -> str:
    return f"{100 * float(value):.1f}" if value not in ("", None) else ""


def table(records: list[dict]) -> tuple[list[dict], str]:
    """Rows of (held out, row, k) with mean +- std over seeds per metric, and the markdown table."""
    rows = []
    for record in records:
        with open(record["summary"]) as f:
            for line in csv.DictReader(f):
                item = {"held_out": line["dataset"], "row": record["row"], "k": int(line["k"]),
                        "seeds": int(line["seeds"])}
                for metric in METRICS:
                    item[f"{metric}_mean"] = line.get(f"{metric}_mean", "")
                    item[f"{metric}_std"] = line.get(f"{metric}_std", "")
                rows.append(item)
    order = {row: i for i, row in enumerate(ROWS)}
    rows.sort(key=lambda r: (r["held_out"], r["k"], order[r["row"]]))
    lines = ["| held out | k | row | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        cells = []
        for metric in METRICS:
            mean, std = _percent(r[f"{metric}_mean"]), _percent(r[f"{metric}_std"])
            cells.append("n/a" if not mean else f"{mean} ± {std}" if std else mean)
        lines.append(f"| {r['held_out']} | {r['k']} | {r['row']} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default=".demo/bench",
                        help="a built benchmark (build-bench --scale small)")
    parser.add_argument("--out", default=".demo/table")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--force", action="store_true", help="rerun rows that already have a summary")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.bench, "_manifest.json")):
        raise SystemExit(f"{args.bench}: no benchmark there; build it with "
                         f"`residual-ad build-bench {args.bench} --scale small`")
    os.makedirs(args.out, exist_ok=True)
    records = []
    for row in args.rows:
        print(f"[table] {row} ...", flush=True)
        records.append(run_row(row, args.bench, args.out, args.seeds, args.force))
        print(f"[table] {row}: {records[-1]['wall_s']:.0f} s (load {records[-1]['load_before']} -> "
              f"{records[-1]['load_after']})", flush=True)
    rows, markdown = table(records)
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    for record in records:
        print(f"{record['row']}: {record['wall_s']:.0f} s, "
              f"load {record['load_before']} -> {record['load_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
