"""Metrics engine vs exact references: continuous scores at 10^7 and 10^8 pixels, and 10^8 pixels
with 10^6 distinct scores in a narrow range.

``continuous`` (the first table): it streams synthetic anomaly maps (256x256 images, half of them with
rectangular anomalies, generated chunk by chunk from a seed) through ``MetricAccumulator`` and times the
whole engine (all image and pixel metrics, AUPRO included). It then rebuilds the same pixels in memory
and times scikit-learn's ``roc_auc_score`` (pixel AUROC) and an exact sort-based AUPRO (one global sort,
per-pixel weights 1/|region|, cumulative sums), and prints the largest absolute difference of the
engine from each reference together with the engine's certified error bounds.

``narrow`` (issue 13): every pixel score is one of ``--levels`` float32 values 1e-7 apart in
[0.5, 0.6) (uniform on the lower three quarters of the range for normal pixels, on the upper three
quarters inside 1-3 rectangular regions of every other image), so both classes cover most of the
distinct values; image scores (mean of the 256 highest pixels plus noise) are float64. The exact
reference counts the pixels of every distinct value per class (and the 1/|region| weights) chunk by
chunk, then forms every metric from those counts, thresholds at every distinct value: the sort-based
definition with ties grouped, in O(levels) memory whatever the number of pixels. ``--sklearn`` also
checks that reference against scikit-learn and the sort-based AUPRO on the same pixels (small sizes).

Peak memory is the tracemalloc peak above what was allocated before the measured call (numpy reports
its buffers to tracemalloc), so no figure includes the input pixels (generated beforehand; the engine
streams them in chunks of ``--chunk`` images). "state" is the pickled ``state_dict()``.

    .venv/bin/python benchmarks/metrics.py                         # continuous, 10^7 and 10^8 pixels
    .venv/bin/python benchmarks/metrics.py --pixels 1e6 --ap-f1    # quick run, AP/F1 references too
    .venv/bin/python benchmarks/metrics.py --case narrow --pixels 1e8           # issue 13's case
    .venv/bin/python benchmarks/metrics.py --case narrow --pixels 1e6 --sklearn # reference check
    .venv/bin/python benchmarks/metrics.py --case finish --pixels 3.2e6 --size 224  # one category
    .venv/bin/python benchmarks/metrics.py --case state --pixels 3.2e6 --size 224   # one actor's shard

``finish``: what `evaluate`'s driver does per category once its shards are in: the normal images and
two defect types as three groups, through their states, merged for the category and per defect type,
then every metric. It times the merges, and the metrics computed as before ``curve_bins`` (every occupied
bin, float sums) side by side with ``compute()`` now, and prints their largest difference.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import time
import tracemalloc
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from residual_core.metrics import IMAGE_METRICS, GroupedAccumulator, MetricAccumulator, curves
from residual_core.metrics.histogram import AlignedBins, CollapsingHistogram, union_keys
from residual_core.metrics.regions import anomalous_pixel_regions

NARROW_STEP = 1e-7  # float32 spacing near 0.5 is 6e-8: consecutive levels stay distinct


def defect_masks(rng: np.random.Generator, start: int, count: int, size: int) -> tuple:
    """Labels (every second image anomalous) and masks of 1-3 random rectangles per anomalous image."""
    masks = np.zeros((count, size, size), dtype=bool)
    labels = (np.arange(start, start + count) % 2).astype(np.int64)
    for i in np.flatnonzero(labels):
        for _ in range(int(rng.integers(1, 4))):
            h, w = rng.integers(2, size // 4, 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y:y + h, x:x + w] = True
    return labels, masks


def synthetic_chunks(pixels: int, size: int, chunk_images: int, seed: int) -> Iterator[tuple]:
    """Yield (image scores, labels, maps float32 [B,S,S], masks bool [B,S,S]) chunks totalling ~pixels."""
    rng = np.random.default_rng(seed)
    images = max(2, round(pixels / (size * size)))
    for start in range(0, images, chunk_images):
        count = min(chunk_images, images - start)
        labels, masks = defect_masks(rng, start, count, size)
        maps = rng.random((count, size, size), dtype=np.float32) * 0.7
        maps += masks * rng.random((count, size, size), dtype=np.float32) * 0.5
        scores = maps.reshape(count, -1).max(axis=1)
        yield scores, labels, maps, masks


def measured(fn: Callable[[], object]) -> tuple[object, float, int]:
    """(result, seconds, peak bytes allocated above the start) of ``fn()``."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return result, seconds, peak


def run_engine(chunks: list[tuple], device: str) -> dict:
    """All metrics of ``chunks``, plus ``state_bytes``: the size of the pickled state (what a shard ships)."""
    acc = MetricAccumulator()
    for scores, labels, maps, masks in chunks:
        if device != "cpu":
            maps = torch.from_numpy(maps).to(device)
        acc.update(scores, labels, maps, masks)
    return {**acc.compute(), "state_bytes": len(pickle.dumps(acc.state_dict()))}


def exact_sorted_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Exact AUPRO by one global sort: PRO(t) = sum over pixels >= t of 1/|region| / #regions."""
    regions, sizes = anomalous_pixel_regions(masks)
    weights = np.zeros(maps.size)
    weights[masks.reshape(-1)] = 1.0 / sizes[regions]
    del regions
    scores = maps.reshape(-1)
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    last_of_tie = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    del sorted_scores
    normal = ~masks.reshape(-1)[order]
    fpr = np.cumsum(normal)[last_of_tie] / float(normal.sum())
    del normal
    pro = np.cumsum(weights[order])[last_of_tie] / (len(sizes) - 1)
    return area_to_limit(fpr, pro, limit)


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area of the curve from (0, 0) through (fpr, pro) on [0, limit], interpolated at the limit,
    divided by the limit."""
    fpr, pro = np.append(0.0, fpr), np.append(0.0, pro)
    end = int(np.searchsorted(fpr, limit))  # first point at or beyond the limit
    y_at = pro[end - 1] + (pro[end] - pro[end - 1]) * (limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
    x, y = np.append(fpr[:end], limit), np.append(pro[:end], y_at)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2 / limit)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(np.nanmax(2 * precision * recall / np.maximum(precision + recall, 1e-300)))


def benchmark(args, pixels: int) -> list[tuple]:
    chunks = list(synthetic_chunks(pixels, args.size, args.chunk, args.seed))
    result, seconds, peak = measured(partial(run_engine, chunks, "cpu"))
    bounds, resolution = result["resolution"]["error_bounds"], result["resolution"]
    print(f"[{pixels:.0e}] engine cpu {seconds:.1f}s peak {peak / 2**20:.0f} MiB state "
          f"{result['state_bytes'] / 2**20:.1f} MiB shift {resolution['pixel_shift']} bins "
          f"{resolution['pixel_bins']} bounds " + " ".join(f"{k} {v:.1e}" for k, v in bounds.items()),
          flush=True)
    engine_rows = [("engine (numpy, all 7 metrics)", seconds, peak)]
    if args.device != "cpu" and torch.cuda.is_available():
        on_device, device_seconds, device_peak = measured(partial(run_engine, chunks, args.device))
        assert on_device["P-AUROC"] == result["P-AUROC"] and on_device["AUPRO@0.3"] == result["AUPRO@0.3"]
        engine_rows.append((f"engine ({args.device} maps)", device_seconds, device_peak))
    if args.engine_only:
        return [(pixels, name, secs, mem, "", "") for name, secs, mem in engine_rows]
    maps = np.concatenate([c[2] for c in chunks])
    masks = np.concatenate([c[3] for c in chunks])
    chunks.clear()
    flat_labels, flat_maps = masks.reshape(-1), maps.reshape(-1)
    auroc, auroc_s, auroc_peak = measured(lambda: roc_auc_score(flat_labels, flat_maps))
    print(f"[{pixels:.0e}] sklearn roc_auc_score {auroc_s:.1f}s", flush=True)
    aupro, aupro_s, aupro_peak = measured(lambda: exact_sorted_aupro(maps, masks))
    print(f"[{pixels:.0e}] exact AUPRO {aupro_s:.1f}s", flush=True)
    diffs = {"P-AUROC": abs(result["P-AUROC"] - auroc), "AUPRO@0.3": abs(result["AUPRO@0.3"] - aupro)}
    if args.ap_f1:
        diffs["P-AP"] = abs(result["P-AP"] - average_precision_score(flat_labels, flat_maps))
        diffs["P-F1max"] = abs(result["P-F1max"] - f1_max(flat_labels, flat_maps))
    size, engine_seconds = maps.size, engine_rows[0][1]
    rows = [(size, name, secs, mem, "", "") for name, secs, mem in engine_rows]
    for name, metric, secs, mem in (("sklearn roc_auc_score", "P-AUROC", auroc_s, auroc_peak),
                                    ("exact sort-based AUPRO", "AUPRO@0.3", aupro_s, aupro_peak)):
        rows.append((size, f"{name} ({metric})", secs, mem, f"{secs / engine_seconds:.1f}x",
                     f"{diffs[metric]:.1e} (bound {bounds[metric]:.1e})"))
    for name in ("P-AP", "P-F1max"):
        if name in diffs:
            rows.append((size, f"sklearn {name} reference", float("nan"), 0, "",
                         f"{diffs[name]:.1e} (bound {bounds[name]:.1e})"))
    return rows


def narrow_chunks(pixels: int, size: int, chunk_images: int, levels: int, seed: int) -> Iterator[tuple]:
    """Yield (image scores float64, labels, maps float32 [B,S,S] on a grid of ``levels`` values, masks)."""
    rng = np.random.default_rng(seed)
    grid = narrow_grid(levels)
    images = max(2, round(pixels / (size * size)))
    for start in range(0, images, chunk_images):
        count = min(chunk_images, images - start)
        labels, masks = defect_masks(rng, start, count, size)
        position = rng.random((count, size, size), dtype=np.float32) * 0.75
        position += masks * np.float32(0.25)  # anomalous pixels: a quarter of the range higher
        level = np.minimum((position * levels).astype(np.int64), levels - 1)
        del position
        maps = grid[level]
        del level
        top = np.sort(maps.reshape(count, -1), axis=1)[:, -256:]  # mean of the 256 highest, in float64
        noise = rng.normal(scale=0.08 * levels * NARROW_STEP, size=count)  # 8% of the score range
        scores = top.astype(np.float64).mean(axis=1) + noise
        yield scores, labels, maps, masks


def narrow_grid(levels: int) -> np.ndarray:
    grid = (0.5 + np.arange(levels) * NARROW_STEP).astype(np.float32)
    if len(np.unique(grid)) != levels:
        raise ValueError(f"{levels} levels {NARROW_STEP} apart are not distinct in float32")
    return grid


def counted_reference(chunks: list[tuple], levels: int, limit: float = 0.3) -> dict[str, float]:
    """Exact pixel metrics from per-value counts (every distinct score a threshold, ties grouped)."""
    grid = narrow_grid(levels)
    negatives = np.zeros(levels, dtype=np.int64)
    positives = np.zeros(levels, dtype=np.int64)
    overlap = np.zeros(levels)  # sum over anomalous pixels of 1/|region|
    regions = 0
    for _, _, maps, masks in chunks:
        level = np.searchsorted(grid, maps)  # maps hold grid values only
        negatives += np.bincount(level[~masks], minlength=levels)
        positives += np.bincount(level[masks], minlength=levels)
        region, sizes = anomalous_pixel_regions(masks)
        overlap += np.bincount(level[masks], weights=1.0 / sizes[region], minlength=levels)
        regions += len(sizes) - 1
    seen = (negatives + positives)[::-1] > 0  # thresholds: the distinct values present, highest first
    tp = np.cumsum(positives[::-1])[seen].astype(np.float64)
    fp = np.cumsum(negatives[::-1])[seen].astype(np.float64)
    pro = np.cumsum(overlap[::-1])[seen] / regions
    p, n = tp[-1], fp[-1]
    fpr, tpr = np.append(0.0, fp / n), np.append(0.0, tp / p)
    return {"P-AUROC": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2),
            "P-AP": float(np.sum(np.diff(np.append(0.0, tp)) / p * tp / (tp + fp))),
            "P-F1max": float(np.max(2 * tp / (tp + fp + p))),
            f"AUPRO@{limit:g}": area_to_limit(fp / n, pro, limit),
            "distinct": int(seen.sum())}


def image_reference(chunks: list[tuple]) -> dict[str, float]:
    labels = np.concatenate([c[1] for c in chunks])
    scores = np.concatenate([c[0] for c in chunks])  # float64, as the engine sees them
    return dict(zip(IMAGE_METRICS, (roc_auc_score(labels, scores), average_precision_score(labels, scores),
                                    f1_max(labels, scores)), strict=True))


def benchmark_narrow(args, pixels: int) -> None:
    chunks = list(narrow_chunks(pixels, args.size, args.chunk, args.levels, args.seed))

    result, seconds, peak = measured(partial(run_engine, chunks, "cpu"))
    state_bytes = result["state_bytes"]
    reference = counted_reference(chunks, args.levels)
    distinct = reference.pop("distinct")
    reference.update(image_reference(chunks))
    resolution = result["resolution"]
    print(f"\n[narrow {pixels:.0e}] {distinct} distinct pixel scores; engine cpu {seconds:.1f}s peak "
          f"{peak / 2**20:.0f} MiB, state {state_bytes / 2**20:.1f} MiB, pixel shift "
          f"{resolution['pixel_shift']}, {resolution['pixel_bins']} bins", flush=True)
    checks = {"exact counts": reference}
    if args.sklearn:
        flat_labels = np.concatenate([c[3] for c in chunks]).reshape(-1)
        flat_maps = np.concatenate([c[2] for c in chunks]).reshape(-1)
        checks["scikit-learn / sort-based"] = {
            "P-AUROC": roc_auc_score(flat_labels, flat_maps),
            "P-AP": average_precision_score(flat_labels, flat_maps),
            "P-F1max": f1_max(flat_labels, flat_maps),
            "AUPRO@0.3": exact_sorted_aupro(np.concatenate([c[2] for c in chunks]),
                                            np.concatenate([c[3] for c in chunks]))}
        print("reference check: max |exact counts - sklearn| = "
              f"{max(abs(reference[k] - v) for k, v in checks['scikit-learn / sort-based'].items()):.1e}")
    print("| pixels | distinct scores | metric | engine | reference | abs diff | bound |")
    print("|---|---|---|---|---|---|---|")
    for name, exact in reference.items():
        print(f"| {pixels:.0e} | {distinct} | {name} | {result[name]:.10f} | {exact:.10f} | "
              f"{abs(result[name] - exact):.1e} | {resolution['error_bounds'][name]:.1e} |")


def every_bin_metrics(acc: MetricAccumulator) -> dict[str, float]:
    """The image and pixel metrics as ``compute`` did them before ``curve_bins``: every occupied bin
    (``aligned()``), AUROC and AP as float sums (``np.sum``)."""
    def float_auroc(c: curves.CumulativeCounts) -> float:
        fpr = np.concatenate([[0.0], c.false_positives / c.negatives])
        tpr = np.concatenate([[0.0], c.true_positives / c.positives])
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)

    def float_ap(c: curves.CumulativeCounts) -> float:
        tps = c.true_positives.astype(np.float64)
        steps = np.diff(np.concatenate([[0.0], tps])) / c.positives
        return float(np.sum(steps * tps / (tps + c.false_positives)))

    image = curves.CumulativeCounts.from_bins(acc.image_hist.aligned())
    pixel = curves.CumulativeCounts.from_bins(acc.pixel_hist.aligned())
    values = [float_auroc(image), float_ap(image), curves.f1_max(image), float_auroc(pixel), float_ap(pixel),
              curves.f1_max(pixel), curves.aupro(pixel, acc.counts.regions)]
    return dict(zip([*IMAGE_METRICS, "P-AUROC", "P-AP", "P-F1max", "AUPRO@0.3"], values, strict=True))


def benchmark_finish(args, pixels: int) -> None:
    """One category's finalisation on the driver: group merges, then metrics by both curve paths."""
    grouped = GroupedAccumulator()
    for scores, labels, maps, masks in synthetic_chunks(pixels, args.size, args.chunk, args.seed):
        kinds = np.where(labels == 0, "normal", np.where(np.arange(len(labels)) % 4 == 1, "defect:a",
                                                         "defect:b"))
        grouped.update(kinds.tolist(), scores, labels, maps, masks)
    grouped = GroupedAccumulator.from_state_dict(pickle.loads(pickle.dumps(grouped.state_dict())))
    start = time.perf_counter()
    merged = [grouped.merged(), *(grouped.merged(["normal", defect]) for defect in ("defect:a", "defect:b"))]
    merge_seconds = time.perf_counter() - start
    timings = {"every bin": [], "curve_bins": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        before = [every_bin_metrics(acc) for acc in merged]
        timings["every bin"].append(time.perf_counter() - start)
        start = time.perf_counter()
        now = [acc.compute() for acc in merged]
        timings["curve_bins"].append(time.perf_counter() - start)
    diff = max(abs(old[name] - new[name]) for old, new in zip(before, now, strict=True) for name in old)
    resolution = now[0]["resolution"]
    every, summed = min(timings["every bin"]), min(timings["curve_bins"])
    print(f"\n[finish {pixels:.1e} pixels, {args.size} px] {resolution['pixel_bins']} distinct pixel bins "
          f"(shift {resolution['pixel_shift']}); best of {args.repeats}")
    print("| step | seconds | share of the finish before |")
    print("|---|---:|---:|")
    before_total = merge_seconds + every  # the finish before curve_bins
    print(f"| merges (category, 2 defect types) | {merge_seconds:.3f} | {merge_seconds / before_total:.0%} |")
    print(f"| metrics on every bin (before) | {every:.3f} | {every / before_total:.0%} |")
    print(f"| metrics on `curve_bins` (now) | {summed:.3f} | {summed / before_total:.0%} |")
    print(f"finish before / now: {before_total / (merge_seconds + summed):.2f}x; "
          f"largest metric difference {diff:.1e}")


def sorted_union_aligned(hist: CollapsingHistogram) -> AlignedBins:
    """``CollapsingHistogram.aligned`` as it was before the binary-search placement: the union of both
    classes' keys by a sort, then every normal key searched in it."""
    hist.consolidate()
    keys = union_keys(hist.normal.keys, hist.anomalous.keys)
    negatives = np.zeros(len(keys), dtype=np.int64)
    positives, overlap = negatives.copy(), negatives.copy()
    negatives[np.searchsorted(keys, hist.normal.keys)] = hist.normal.counts
    where = np.searchsorted(keys, hist.anomalous.keys)
    positives[where] = hist.anomalous.counts
    overlap[where] = hist.anomalous.overlap
    return AlignedBins(hist.normal.shift, keys, negatives, positives, overlap)


def benchmark_state(args, pixels: int) -> None:
    """A scoring actor's per-shard `state_dict()` (after the shard's updates), with the aligned bins placed
    by binary search (now) and by the sorted union (before); the states must be equal."""
    grouped = GroupedAccumulator()
    for scores, labels, maps, masks in synthetic_chunks(pixels, args.size, args.chunk, args.seed):
        kinds = np.where(labels == 0, "normal", "defect:a")
        grouped.update(kinds.tolist(), scores, labels, maps, masks)
    blob = pickle.dumps(grouped)
    timings, states = {"before": [], "now": []}, {}
    for _ in range(args.repeats):
        for name in ("before", "now"):
            copy = pickle.loads(blob)
            original = CollapsingHistogram.aligned
            if name == "before":
                CollapsingHistogram.aligned = sorted_union_aligned
            try:
                start = time.perf_counter()
                states[name] = copy.state_dict()
                timings[name].append(time.perf_counter() - start)
            finally:
                CollapsingHistogram.aligned = original
    same = pickle.dumps(states["before"]) == pickle.dumps(states["now"])
    before, now = min(timings["before"]), min(timings["now"])
    print(f"\n[state {pixels:.1e} pixels, {args.size} px, 2 groups] best of {args.repeats}: "
          f"before {before:.3f} s, now {now:.3f} s ({before / now:.2f}x); same state: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=float, nargs="+", default=[1e7, 1e8])
    parser.add_argument("--size", type=int, default=256, help="image side")
    parser.add_argument("--chunk", type=int, default=32, help="images per engine update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ap-f1", action="store_true", help="also check P-AP and P-F1max against sklearn")
    parser.add_argument("--engine-only", action="store_true", help="continuous: skip the references")
    parser.add_argument("--case", choices=("continuous", "narrow", "finish", "state"), default="continuous")
    parser.add_argument("--repeats", type=int, default=3, help="finish, state: best of")
    parser.add_argument("--levels", type=float, default=1e6, help="narrow: distinct pixel scores")
    parser.add_argument("--sklearn", action="store_true", help="narrow: check the reference against sklearn")
    args = parser.parse_args()
    if args.case in ("finish", "state"):
        for pixels in args.pixels:
            (benchmark_finish if args.case == "finish" else benchmark_state)(args, int(pixels))
        return
    if args.case == "narrow":
        args.levels = int(args.levels)
        for pixels in args.pixels:
            benchmark_narrow(args, int(pixels))
            gc.collect()
        return
    rows = []
    for pixels in args.pixels:
        rows.extend(benchmark(args, int(pixels)))
        gc.collect()
    print("\n| pixels | method | time (s) | peak memory (MiB) | reference / engine time | max abs diff |")
    print("|---|---|---|---|---|---|")
    for size, name, secs, mem, ratio, diff in rows:
        time_text = "" if secs != secs else f"{secs:.1f}"
        mem_text = f"{mem / 2**20:.0f}" if mem else ""
        print(f"| {size:.2e} | {name} | {time_text} | {mem_text} | {ratio} | {diff} |")


if __name__ == "__main__":
    main()
