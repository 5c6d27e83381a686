"""Nearest-neighbour retrieval for reference banks: exact torch (dense, blocked) vs FAISS flat / IVF / HNSW.

Tables (`--tables`, default `exact strategy`):
- exact: few-shot bank sizes (`--exact-sizes`, default 10^3..10^5) x dimensions (`--dims`, default 24,
  112, 1024), top-1 and top-k (`--ks`): the dense torch path (full [block, N] score matrices of at most
  64 MiB, then argmax / topk: what the engine and ResAD used before), the blocked exact search
  (`residual_core.matching.knn.exact_search`), FAISS flat, IVF and HNSW (top-1; recall against the
  exact answer, build time). Every method runs at `--threads` (default 1) torch and FAISS threads,
  timings are interleaved rounds (best of `--repeats`), so the ratios are measured side by side.
- strategy: the full Res2CLIP strategy (`sparse_radial_knn`, `radial_1nn`) on both execution paths
  for a realistic bank (k shots of a 37x37 grid, as ViT-L/14 at 518 px).
- retrieval: the earlier 768-d table up to 10^6 vectors (`--sizes`), torch dense vs FAISS.
Data are synthetic "patch-like" vectors (a low-dimensional latent mixture lifted to D dimensions plus
noise); queries are fresh draws from the same distribution, like patches of other images of the category.

    .venv/bin/python benchmarks/matching.py                 # the RESULTS.md run
    .venv/bin/python benchmarks/matching.py --exact-sizes 1000 --dims 24 --tables exact   # quick
    .venv/bin/python benchmarks/matching.py --tables retrieval --sizes 1000 10000 --queries 500
    .venv/bin/python benchmarks/matching.py --tables exact --gpu     # + torch on cuda, FAISS-GPU flat
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import resource
import time

import faiss
import torch

from residual_core import faiss_index
from residual_core.faiss_index import IndexSpec
from residual_core.matching import grid_positions, knn, match, parse_strategy, prepare_reference

DIM = 768
LATENT = 64
CLUSTERS = 256


class PatchDistribution:
    """Patch-like vectors: one of 256 cluster centres + a 64-d latent variation lifted to D + noise."""

    def __init__(self, seed: int, dim: int = DIM):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.latent = dim, min(LATENT, dim)
        self.lift = torch.randn(self.latent, dim, generator=g) / math.sqrt(self.latent)
        self.centres = torch.randn(CLUSTERS, dim, generator=g)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        label = torch.randint(CLUSTERS, (n,), generator=generator)
        latent = torch.randn(n, self.latent, generator=generator) @ self.lift
        x = self.centres[label] + latent + 0.3 * torch.randn(n, self.dim, generator=generator)
        return faiss_index.normalise_rows(x)


def synthetic_bank(distribution: PatchDistribution, size: int, seed: int, chunk: int = 100_000):
    """Yield L2-normalised chunks of `size` bank vectors."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, size, chunk):
        yield distribution.sample(min(chunk, size - start), g)


def flat_view(index: faiss.IndexFlat) -> torch.Tensor:
    """The flat index's own storage as an [N, D] tensor (no copy): the torch baseline shares it."""
    array = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
    return torch.from_numpy(array).view(index.ntotal, index.d)


def torch_top1(bank: torch.Tensor, queries: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """Exact top-1 by batched matmul, query blocks sized so one [block, N] score matrix is <= 64 MiB."""
    batch = max(1, max_elements // bank.shape[0])
    return torch.cat([(queries[i : i + batch] @ bank.T).argmax(-1) for i in range(0, len(queries), batch)])


def torch_dense_topk(bank: torch.Tensor, queries: torch.Tensor, k: int, max_elements: int = 1 << 24):
    """The dense path: [block, N] score matrices of at most `max_elements`, then argmax / topk."""
    batch = max(1, max_elements // bank.shape[0])
    if k == 1:
        return torch_top1(bank, queries, max_elements)[:, None]
    blocks = [(queries[i : i + batch] @ bank.T).topk(k, dim=1).indices for i in range(0, len(queries), batch)]
    return torch.cat(blocks)


def interleaved_best(functions: dict, repeats: int) -> dict:
    """Best wall time of each function over `repeats` rounds, the functions taking turns in each round
    (so a load change on a shared machine hits all of them alike)."""
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            with Stopwatch() as watch:
                function()
            best[name] = min(best[name], watch.seconds)
    return best


def gpu_functions(flat, bank: torch.Tensor, queries: torch.Tensor, k: int) -> dict:
    """The exact searches on the GPU (`--gpu`): the blocked torch search on cuda (synchronised, so a timing
    covers the work) and, with a GPU build of FAISS, FAISS flat moved there."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu: needs a CUDA device")
    bank_cuda, queries_cuda = bank.cuda(), queries.cuda()

    def synced(run):
        def timed():
            out = run()
            torch.cuda.synchronize()
            return out
        return timed

    functions = {"blocked torch cuda": synced(functools.partial(knn.exact_search, queries_cuda, bank_cuda, k,
                                                                backend="torch"))}
    if faiss_index.gpu_available():
        on_gpu = faiss_index.to_device(flat, "cuda")
        functions["faiss flat gpu"] = functools.partial(faiss_index.search, on_gpu, queries, k)
    return functions


def exact_table(sizes, dims, ks, work, max_queries, repeats, hnsw_max_size, ivf_max_size, seed, gpu=False):
    """Top-1 / top-k at few-shot bank sizes: dense torch, blocked exact search, FAISS flat / IVF / HNSW;
    with `gpu` also FAISS flat on the GPU and the blocked torch search on cuda."""
    rows = []
    for dim in dims:
        distribution = PatchDistribution(seed, dim)
        for size in sizes:
            gc.collect()
            bank = distribution.sample(size, torch.Generator().manual_seed(seed + 1))
            count = int(min(max_queries, max(256, work // (size * dim))))
            queries = distribution.sample(count, torch.Generator().manual_seed(seed + 2))
            with Stopwatch() as building:
                flat = faiss_index.build_index(bank, normalise=False)
            flat_build = building.seconds
            for k in ks:
                exact = torch_dense_topk(bank, queries, k)
                functions = {
                    "torch dense": functools.partial(torch_dense_topk, bank, queries, k),
                    "blocked torch": functools.partial(knn.exact_search, queries, bank, k, backend="torch"),
                    "faiss knn": functools.partial(knn.exact_search, queries, bank, k, backend="faiss"),
                    "faiss flat": functools.partial(faiss_index.search, flat, queries, k),
                }
                if gpu:
                    functions.update(gpu_functions(flat, bank, queries, k))
                results = {name: run()[1].cpu() for name, run in functions.items() if name != "torch dense"}
                builds = dict.fromkeys(functions, 0.0) | {"faiss flat": flat_build}
                if k == 1:
                    specs = [("ivf", ivf_spec(size))] if size <= ivf_max_size else []
                    if size <= hnsw_max_size:
                        specs.append(("hnsw", IndexSpec(kind="hnsw", ef_construction=80, ef_search=128)))
                    for kind, spec in specs:
                        with Stopwatch() as building:
                            index = faiss_index.build_index(bank, spec, normalise=False)
                        label = f"ivf{index.nlist} np{index.nprobe}" if kind == "ivf" else "hnsw M32 ef128"
                        functions[label] = functools.partial(faiss_index.search, index, queries, 1)
                        results[label] = faiss_index.search(index, queries, 1)[1]
                        builds[label] = building.seconds
                times = interleaved_best(functions, repeats)
                for name, seconds in times.items():
                    found = results.get(name, exact)
                    if not name.startswith(("ivf", "hnsw")):
                        # exact methods: the same neighbours (top-1 ids; top-k as sets, ties aside)
                        same = found.sort(dim=1).values == exact.sort(dim=1).values
                        recall = float(same.all(dim=1).float().mean())
                    else:
                        recall = float((found[:, 0] == exact[:, 0]).float().mean())
                    rows.append(
                        (dim, size, count, k, name, count / seconds, times["torch dense"] / seconds,
                         times["faiss flat"] / seconds, recall, builds[name])
                    )
                print(
                    f"[d={dim} N={size} k={k}] "
                    + ", ".join(f"{name} {count / t:,.0f} q/s" for name, t in times.items()),
                    flush=True,
                )
            del bank, flat
    return rows


class Stopwatch:
    """`with Stopwatch() as watch: ...` then `watch.seconds`."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def ivf_spec(size: int) -> IndexSpec:
    return IndexSpec(kind="ivf", nlist=int(min(1024, 4 * math.sqrt(size))), nprobe=16, train_size=50_000)


def retrieval_table(sizes, n_queries, big_queries, hnsw_m, ef_construction, seed, hnsw_max_size):
    rows = []
    for size in sizes:
        gc.collect()
        flat = faiss.IndexFlatIP(DIM)
        build_flat = 0.0
        distribution = PatchDistribution(seed)
        for chunk in synthetic_bank(distribution, size, seed + 1):
            with Stopwatch() as watch:
                flat.add(chunk.numpy())
            build_flat += watch.seconds
        bank = flat_view(flat)
        q_count = min(n_queries if size < 1_000_000 else big_queries, size)
        queries = distribution.sample(q_count, torch.Generator().manual_seed(seed + 2))  # fresh patches
        with Stopwatch() as watch:
            exact = torch_top1(bank, queries)
        torch_qps = q_count / watch.seconds
        bank_bytes = size * DIM * 4
        rows.append(("torch exact", size, q_count, torch_qps, 1.0, 1.0, bank_bytes, 0.0))
        print(f"[{size}] torch exact {torch_qps:.0f} q/s", flush=True)
        with Stopwatch() as watch:
            _, ids = faiss_index.search(flat, queries, 1)
        t = watch.seconds
        recall = (ids[:, 0] == exact).float().mean().item()
        rows.append(
            (
                "faiss flat",
                size,
                q_count,
                q_count / t,
                q_count / t / torch_qps,
                recall,
                faiss_index.index_memory_bytes(flat),
                build_flat,
            )
        )
        print(f"[{size}] faiss flat {q_count / t:.0f} q/s", flush=True)
        specs = [ivf_spec(size)]
        if size <= hnsw_max_size:
            specs.append(
                IndexSpec(kind="hnsw", hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=128)
            )
        else:
            print(f"[{size}] hnsw skipped (--hnsw-max-size {hnsw_max_size}: build time)", flush=True)
        for spec in specs:
            gc.collect()
            with Stopwatch() as building:
                index = faiss_index.build_index(bank, spec, normalise=False)
            build = building.seconds
            with Stopwatch() as watch:
                _, ids = faiss_index.search(index, queries, 1)
            t = watch.seconds
            recall = (ids[:, 0] == exact).float().mean().item()
            label = f"ivf{index.nlist} np{index.nprobe}" if spec.kind == "ivf" else f"hnsw M{hnsw_m} ef128"
            rows.append(
                (
                    label,
                    size,
                    q_count,
                    q_count / t,
                    q_count / t / torch_qps,
                    recall,
                    faiss_index.index_memory_bytes(index),
                    build,
                )
            )
            print(f"[{size}] {label} {q_count / t:.0f} q/s, build {build:.1f}s", flush=True)
            del index
        del bank, flat
    return rows


def strategy_table(shots_list, side, queries_images, seed):
    """Full strategy cost: torch brute force vs FAISS candidates + exact re-rank (flat index)."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    grid = (side, side)
    for shots in shots_list:
        base = torch.randn(side * side, DIM, generator=g)
        refs = torch.cat([base + 0.5 * torch.randn(base.shape, generator=g) for _ in range(shots)])
        queries = faiss_index.normalise_rows(
            torch.stack([base + 0.5 * torch.randn(base.shape, generator=g) for _ in range(queries_images)])
        )
        reference = prepare_reference(refs, grid_positions(grid).repeat(shots, 1), grid)
        index = faiss_index.build_index(reference.features, normalise=False)
        for text in ("sparse_radial_knn", "radial_1nn"):
            strategy = parse_strategy(text)
            with Stopwatch() as watch:
                brute = match(queries, reference, strategy)
            t_torch = watch.seconds
            with Stopwatch() as watch:
                fast = match(queries, reference, strategy, path="faiss", index=index)
            t_faiss = watch.seconds
            same = torch.allclose(brute.matched, fast.matched, atol=1e-5)
            patches = queries.shape[0] * queries.shape[1]
            rows.append(
                (
                    text,
                    shots,
                    refs.shape[0],
                    patches / t_torch,
                    patches / t_faiss,
                    fast.fallback_rows / patches,
                    same,
                )
            )
            print(
                f"[strategy {text} {shots}-shot] torch {patches / t_torch:.0f} patches/s, "
                f"faiss {patches / t_faiss:.0f} patches/s",
                flush=True,
            )
    return rows


def print_tables(exact, retrieval, strategies, args):
    print()
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    load = os.getloadavg()
    print(
        f"threads: torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}; "
        f"cpu cores {os.cpu_count()}; peak RSS {peak_rss_gib:.1f} GiB; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    if exact:
        print(
            "\n| dim | bank size | queries | k | method | queries/s | x torch dense | x faiss flat "
            "| recall | build s |"
        )
        print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        for dim, size, q, k, name, qps, vs_dense, vs_flat, recall, build in exact:
            print(
                f"| {dim} | {size:,} | {q:,} | {k} | {name} | {qps:,.{0 if qps >= 10 else 1}f} | "
                f"{vs_dense:.2f}x | {vs_flat:.2f}x | {recall:.3f} | {build:.1f} |"
            )
    if retrieval:
        print("\n| method | bank size | queries | queries/s | ratio to torch | recall@1 | index memory "
              "| build s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, size, q, qps, ratio, recall, memory, build in retrieval:
            print(
                f"| {name} | {size:,} | {q} | {qps:,.{0 if qps >= 10 else 1}f} | {ratio:.2f}x "
                f"| {recall:.3f} | {memory / 2**20:,.1f} MiB | {build:.1f} |"
            )
    if strategies:
        print(
            f"\nFull strategy ({args.side}x{args.side} grid, {args.strategy_images} query images, dim {DIM}):"
        )
        print("\n| strategy | shots | bank vectors | torch patches/s | faiss patches/s | fallback | equal |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for text, shots, n, torch_rate, faiss_rate, fallback, same in strategies:
            print(
                f"| {text} | {shots} | {n:,} | {torch_rate:,.0f} | {faiss_rate:,.0f} | {fallback:.1%} "
                f"| {same} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["exact", "strategy"],
                        choices=["exact", "strategy", "retrieval"])
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (0: leave as is)")
    parser.add_argument("--exact-sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[24, 112, 1024])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 64])
    parser.add_argument("--work", type=float, default=2e9,
                        help="exact table: queries = work / (N * D), within [256, --max-queries]")
    parser.add_argument("--max-queries", type=int, default=50_176, help="16 images x 56 x 56 patches")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ivf-max-size", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000, help="retrieval: queries for banks below 10^6")
    parser.add_argument("--big-queries", type=int, default=300, help="retrieval: queries for the 10^6 bank")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--hnsw-max-size", type=int, default=10_000, help="skip HNSW above (build time)")
    parser.add_argument("--shots", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--side", type=int, default=37)
    parser.add_argument("--strategy-images", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true",
                        help="exact table: also the blocked torch search on cuda and FAISS flat on the GPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"load average at the start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    if args.gpu and not faiss_index.gpu_available():
        print("--gpu: this FAISS has no GPU support (the `gpu` extra, faiss-gpu-cu12, is not installed): "
              "the torch search on cuda only", flush=True)
    exact = []
    if "exact" in args.tables:
        exact = exact_table(
            args.exact_sizes,
            args.dims,
            args.ks,
            args.work,
            args.max_queries,
            args.repeats,
            args.hnsw_max_size,
            args.ivf_max_size,
            args.seed,
            gpu=args.gpu,
        )
    retrieval = []
    if "retrieval" in args.tables:
        retrieval = retrieval_table(
            args.sizes,
            args.queries,
            args.big_queries,
            args.hnsw_m,
            args.ef_construction,
            args.seed,
            args.hnsw_max_size,
        )
    strategies = []
    if "strategy" in args.tables and args.shots:
        strategies = strategy_table(args.shots, args.side, args.strategy_images, args.seed)
    print_tables(exact, retrieval, strategies, args)


if __name__ == "__main__":
    main()
