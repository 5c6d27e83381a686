"""Live training progress: each training task streams its steps' losses to the driver while it runs.

A task sends `StepReport`s through a Ray queue (`ProgressSender`: buffered, at most one message per
`FLUSH_S`); the driver (`ProgressBoard`) shows one progress bar per job -- step of the planned steps with
tqdm's rate and ETA, the epoch and the running mean of each loss term -- and hands every step to an
optional callback, so per-step losses reach MLflow while training runs, not only at the end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

FLUSH_S = 1.0  # a task sends its buffered steps at most this often (and at the end)
POLL_S = 0.5  # the driver looks for reports this often while it waits for the tasks
RUNNING_WINDOW = 20  # steps in the running mean of each loss shown on the bar
SHOWN_TERMS = 4  # loss terms shown on a bar (all of them go to the callback)

Steps = list[tuple[int, dict[str, float]]]
OnSteps = Callable[[int, Steps], None]  # (job index, new steps)


@dataclass
class StepReport:
    """Steps of one training job since its previous report."""

    job: int
    planned: int | None = None  # the job's planned steps (first report)
    steps: Steps = field(default_factory=list)


class ProgressSender:
    """In a training task: `fit`'s log callback; buffers steps and puts them on the queue in batches."""

    def __init__(self, queue, job: int, planned: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue, self.job, self.clock = queue, job, clock
        self.buffer: Steps = []
        self.last = clock()
        self._put(StepReport(job, planned=planned))

    def _put(self, report: StepReport) -> None:
        if self.queue is not None:
            self.queue.put(report)

    def __call__(self, step: int, metrics: dict[str, float]) -> tuple[int, dict[str, float]]:
        """Buffer one step (sent when `FLUSH_S` has passed since the last send); returns its record."""
        record = (int(step), {k: float(v) for k, v in metrics.items()})
        self.buffer.append(record)
        if self.clock() - self.last >= FLUSH_S:
            self.flush()
        return record

    def flush(self) -> None:
        if self.buffer:
            self._put(StepReport(self.job, steps=self.buffer))
            self.buffer = []
        self.last = self.clock()


class ProgressBoard:
    """On the driver: one bar per training job, fed with the jobs' reports."""

    def __init__(self, labels: list[str], *, progress: bool = True, on_steps: OnSteps | None = None) -> None:
        from tqdm import tqdm

        self.on_steps = on_steps
        self.bars = [tqdm(total=None, desc=label, unit="step", disable=not progress, leave=False)
                     for label in labels]
        self.recent: list[dict[str, deque]] = [{} for _ in labels]
        self.steps_seen = [0] * len(labels)
        self.planned: list[int | None] = [None] * len(labels)

    def handle(self, report: StepReport) -> None:
        bar = self.bars[report.job]
        if report.planned is not None:
            self.planned[report.job] = report.planned
            bar.reset(total=report.planned or None)
        if not report.steps:
            return
        recent = self.recent[report.job]
        for _, metrics in report.steps:
            for name, value in metrics.items():
                if name.startswith("loss_"):
                    recent.setdefault(name, deque(maxlen=RUNNING_WINDOW)).append(value)
        last_step, last = report.steps[-1]
        bar.update(last_step - self.steps_seen[report.job])
        self.steps_seen[report.job] = last_step
        shown = {name[len("loss_"):]: f"{sum(v) / len(v):.4g}"
                 for name, v in list(recent.items())[:SHOWN_TERMS]}
        epoch = f"{int(last['epoch']) + 1}" if "epoch" in last else "?"
        bar.set_postfix({"epoch": epoch, **shown}, refresh=True)
        if self.on_steps is not None:
            self.on_steps(report.job, report.steps)

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def drain(queue, board: ProgressBoard) -> None:
    """Hand every report waiting on the queue to the board."""
    while not queue.empty():
        board.handle(queue.get_nowait())


def wait_with_progress(refs: list, queue, board: ProgressBoard) -> list:
    """The tasks' results (in the order of `refs`), showing their reports as they arrive."""
    import ray

    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            drain(queue, board)
            ray.get(ready)  # a failed task fails the wait now, not after the others
        results = ray.get(list(refs))
        drain(queue, board)  # what the tasks sent last
        return results
    finally:
        board.close()
