"""Start or join Ray: a cluster at `--ray-address`/RAY_ADDRESS, else a local Ray on this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

REDACTION_HOOK = "workflows.redaction.install_in_worker"


def redaction_runtime_env() -> dict:
    """The job's runtime_env: every worker process redacts its stdout, stderr and logging (so Ray's
    session logs hold no secret) with the secrets registered in the driver, passed base64-encoded."""
    from workflows import redaction

    return {"worker_process_setup_hook": REDACTION_HOOK,
            "env_vars": {redaction.TRANSPORT_ENV: redaction.transport_value()}}


WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet a local Ray starts
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's authentication mode ("token" or "disabled")
# Ray Data's own log lines kept on the terminal: warnings and errors; its INFO lines (execution plans,
# "execution finished") still go to the session's ray-data.log
RAY_DATA_CONSOLE_LEVEL = "WARNING"
# A local Ray keeps this many idle worker processes beyond one per CPU. Ray's default keeps one per CPU
# and kills the others after a second idle: starting the scoring actors and Ray Data's own actors (each a
# process of its own) then killed the idle task workers that had already imported torch and the pipeline
# (index step), and the first decode task waited for a new process to start and import it all again,
# about 4-6 s more before the first shard on a 2-core machine (benchmarks/RESULTS.md). Each idle worker
# holds a few hundred MB.
IDLE_WORKERS_BEYOND_CPUS = 6
SOFT_LIMIT_ENV = "RAY_num_workers_soft_limit"  # the user's own setting wins
SHARE_SLACK = 1e-6  # GPUs / share: 3 actors of 1/3 GPU fit one GPU despite float rounding
GPU_ACTOR_CPUS = 1.0  # a GPU scoring actor's CPU share: Ray Data's default beside a GPU (`actor_resources`)
# Without GPUs, the default scoring actors are one per CPU for this share of the cluster's CPUs (rounded, at
# least one; each actor then runs one torch thread), the rest left to the decode tasks: 2 actors on 2 CPUs,
# 7 on 8, 14 on 16. One actor (the earlier default) left all but one core to decoding: on the 2-core
# machine two actors scored 1.5x its steady throughput (benchmarks/RESULTS.md, thirteenth and fifteenth
# passes).
CPU_ACTOR_FRACTION = 7 / 8
# Memory a default CPU actor is planned with (EfficientNet-Lite0 actors peaked at 1.0-1.6 GiB RSS; with a
# larger backbone set `evaluate.num_actors`): no more default actors than the cluster's memory holds.
CPU_ACTOR_MEMORY = 2 << 30


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS); start a local Ray otherwise. Reuses a running one."""
    if ray.is_initialized():
        configure_data_context()
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = redaction_runtime_env()
    # on a cluster the nodes are expected to have residual-ad installed (same image as the driver)
    if address:
        try:
            ray.init(address=address, log_to_driver=True, ignore_reinit_error=True, runtime_env=runtime_env)
        except ValueError as exc:  # `ray job submit` set a conflicting runtime_env: keep the job's
            if "runtime env" not in str(exc) and "runtime_env" not in str(exc):
                raise
            import warnings

            warnings.warn("the job's runtime_env conflicts with residual-ad's redaction hook; Ray workers "
                          "will not redact their own output", stacklevel=2)
            ray.init(address=address, log_to_driver=True, ignore_reinit_error=True)
    else:
        # Ray runs its workers at niceness 15 by default; here the workers are the work (decode, score),
        # and any busy process at niceness 0 on the machine starved them (a suite under two CPU burners
        # stalled). A local Ray's workers run at the driver's priority unless the user set it.
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        # Ray enables token authentication for a new local cluster by default and warns that it did so
        # on every run; saying so explicitly keeps the protection and the terminal quiet
        _explicit_token_auth()
        # address="local": start our own Ray, never silently join whatever `ray start` left running
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=True, runtime_env=runtime_env, _system_config=_local_system_config(num_cpus))
        _ready_workers()
    configure_data_context()


@ray.remote(num_cpus=1)
def _worker_ready() -> None:
    """A no-op task: its worker's first task of this job (see `_ready_workers`)."""


def _ready_workers() -> None:
    """One no-op task per CPU of the local Ray we started, not waited for. A worker's first task of a job
    takes ~0.7 s (the job's setup in that process); done now, it overlaps the driver's planning and bank
    step instead of delaying the first decode tasks of the pipeline (RESULTS.md, thirteenth pass)."""
    for _ in range(int(ray.cluster_resources().get("CPU", 0))):
        _worker_ready.remote()


def _local_system_config(num_cpus: int | None) -> dict:
    """Raylet settings of a local Ray we start: idle workers kept (`IDLE_WORKERS_BEYOND_CPUS`)."""
    if SOFT_LIMIT_ENV in os.environ:
        return {}
    return {"num_workers_soft_limit": int(num_cpus or os.cpu_count() or 1) + IDLE_WORKERS_BEYOND_CPUS}


def _explicit_token_auth() -> None:
    """Token authentication for the local Ray we start, said explicitly: Ray enables it by default for a
    new local cluster and then warns on every run that it did. Ray reads the mode from the environment
    into its cached config at import, so the cache is refreshed the way Ray itself does when it turns
    the default on (`ray._raylet.Config.initialize`)."""
    if AUTH_MODE_ENV in os.environ:
        return
    os.environ[AUTH_MODE_ENV] = "token"
    from ray._raylet import Config

    Config.initialize("")


def configure_data_context() -> None:
    """Ray Data settings of this driver (idempotent): our own progress bars (tqdm, per pipeline stage)
    replace Ray Data's per-operator log lines."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "enable_operator_progress_bars"):
        context.enable_operator_progress_bars = False
    _quiet_ray_data_console()


def _quiet_ray_data_console() -> None:
    """Ray Data's terminal output at `RAY_DATA_CONSOLE_LEVEL`; its log file keeps everything."""
    import logging

    from ray.util.debug import log_once

    # we turned Ray Data's bars off on purpose (ours replace them): its once-per-process WARNING that
    # they are off is not news to the user, so mark it as already said
    log_once("ray_data_progress_manager_disabled")
    for handler in logging.getLogger("ray.data").handlers:
        if not hasattr(handler, "baseFilename") and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(RAY_DATA_CONSOLE_LEVEL)


def cluster_gpus() -> float:
    """GPUs the cluster offers (0 on a CPU-only machine)."""
    return float(ray.cluster_resources().get("GPU", 0))


def gpus_per_worker(requested: float | None) -> float:
    """`requested` when given; else 1 GPU per worker when the cluster has GPUs, 0 otherwise."""
    if requested is not None:
        return float(requested)
    return 1.0 if cluster_gpus() >= 1 else 0.0


def resolve_device(device: str) -> str:
    """The torch device for a config's `device`: explicit wins; `auto` is cuda when this process sees a
    GPU (a worker started with num_gpus > 0), else cpu. The one device resolver of the pipelines."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        full_float32_on_gpu()
    return device


def full_float32_on_gpu() -> None:
    """Float32 convolutions and matrix products in full precision on GPUs. PyTorch lets cuDNN compute float32
    convolutions in TF32 (a 10-bit mantissa) by default on Ampere and newer GPUs, which moved an H100's
    anomaly maps far enough from the CPU's to change pixel metrics by more than 1e-4; the pipelines give
    the same figures on either device, to float rounding."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def actor_cpus(num_actors: int) -> float:
    """CPUs per scoring actor: leave room for the preprocessing tasks beside the actors."""
    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(0.25, min(1.0, (cpus - 0.5) / max(1, num_actors)))


@dataclass(frozen=True)
class ActorPlan:
    """The scoring actors of one `evaluate` or `scan` run: how many, and each one's GPUs and CPUs."""

    actors: int
    gpus: float
    cpus: float


def default_cpu_actors() -> int:
    """Scoring actors on a cluster without GPUs unless told: one per CPU for `CPU_ACTOR_FRACTION` of the
    cluster's CPUs, at most one per `CPU_ACTOR_MEMORY` of its memory, at least one."""
    resources = ray.cluster_resources()
    by_cpus = max(1, round(float(resources.get("CPU", 1)) * CPU_ACTOR_FRACTION))
    memory = float(resources.get("memory", 0))
    return max(1, min(by_cpus, int(memory // CPU_ACTOR_MEMORY))) if memory else by_cpus


def scoring_actors(num_actors: int | None, num_gpus_per_actor: float | None,
                   actors_per_gpu: int, shards: int | None = None) -> ActorPlan:
    """The scoring actors for the `evaluate` settings. GPU share: `num_gpus_per_actor` when given, else
    1 / `actors_per_gpu` on a cluster with GPUs (a GPU actor is bound by its one process, not the GPU:
    benchmarks/RESULTS.md, ninth pass), else 0. Count: `num_actors` when given, else every GPU share the
    cluster has (GPUs / share) or, without GPUs, `default_cpu_actors`; a default count is at most the run's
    `shards` (an actor with no shard to score would only start and load its model). CPUs: `GPU_ACTOR_CPUS`
    beside GPUs, else the actor's share of the cluster's CPUs (`actor_cpus`)."""
    gpus = cluster_gpus()
    if num_gpus_per_actor is not None:
        share = float(num_gpus_per_actor)
    else:
        share = 1.0 / actors_per_gpu if gpus >= 1 else 0.0
    if num_actors is None:
        num_actors = max(1, int(gpus / share + SHARE_SLACK)) if share else default_cpu_actors()
        if shards is not None:
            num_actors = max(1, min(num_actors, int(shards)))
    return ActorPlan(int(num_actors), share, GPU_ACTOR_CPUS if share else actor_cpus(num_actors))


def torch_threads(num_cpus: float) -> int:
    """Intra-op torch threads for a worker holding `num_cpus` CPUs (at least one): so actors sharing a
    node do not each start a thread per core."""
    return max(1, int(num_cpus))


def wait_all(refs: list, label: str, progress: bool) -> list:
    """Results of Ray object refs as they finish, with a progress bar named `label`."""
    from tqdm import tqdm

    pending, done = list(refs), []
    with tqdm(total=len(refs), desc=label, disable=not progress, leave=False) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done.extend(ray.get(ready))
            bar.update(len(ready))
    return done
