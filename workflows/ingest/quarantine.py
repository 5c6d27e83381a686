"""The quarantine report: every rejected input by path and reason, with counts that reconcile."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from workflows import storage

REPORT_DIR = "_quarantine"


@dataclass(frozen=True)
class Problem:
    """One rejected (or, for warnings, kept but marked) input."""

    kind: str       # "image" (counts in seen), "mask", "category", "file"
    path: str       # relative to the source root
    reason: str
    category: str = ""


@dataclass
class QuarantineReport:
    dataset: str
    layout: str
    source: str
    seen: int = 0                  # images found (every kind="image" item)
    written: int = 0
    quarantined: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # kept, but marked (e.g. no mask)
    other_problems: list[Problem] = field(default_factory=list)  # masks, categories, stray files
    # categories written without a normal `train` image: no few-shot references, evaluate cannot use them
    without_references: list[str] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        (self.quarantined if problem.kind == "image" else self.other_problems).append(problem)

    @property
    def reconciles(self) -> bool:
        return self.seen == self.written + len(self.quarantined)

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(_reason_key(p.reason) for p in self.quarantined + self.other_problems))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "layout": self.layout,
            "source": storage.redact(self.source),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "counts": {
                "seen": self.seen,
                "written": self.written,
                "quarantined": len(self.quarantined),
                "kept_with_warnings": len(self.warnings),
                "other_problems": len(self.other_problems),
                "categories_without_references": len(self.without_references),
                "reconciles": self.reconciles,
            },
            "reasons": self.reason_counts(),
            "quarantined": [asdict(p) for p in self.quarantined],
            "warnings": [asdict(p) for p in self.warnings],
            "other_problems": [asdict(p) for p in self.other_problems],
            "categories_without_references": list(self.without_references),
        }

    def summary_lines(self) -> list[str]:
        lines = [
            f"{self.dataset}: seen {self.seen} images = written {self.written} + quarantined "
            f"{len(self.quarantined)}" + ("" if self.reconciles else "  (DOES NOT RECONCILE)"),
        ]
        if self.warnings:
            lines.append(f"  kept with warnings: {len(self.warnings)} "
                         f"({', '.join(sorted({_reason_key(w.reason) for w in self.warnings}))})")
        if self.other_problems:
            lines.append(f"  other problems (masks, categories, stray files): {len(self.other_problems)}")
        for reason, count in sorted(self.reason_counts().items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {count:6d}  {reason}")
        return lines

    def reference_warnings(self) -> list[str]:
        """One line per category without normal `train` images (few-shot evaluation needs k of them)."""
        return [f"warning: {self.dataset}/{category}: no normal train images (references); evaluate, index "
                f"and lodo cannot use this category -- add normal images under its train split "
                f"(folder layout: {category}/train/)" for category in self.without_references]


def _reason_key(reason: str) -> str:
    """Group reasons for the terminal summary (drop the per-file detail after ':')."""
    return reason.split(":", 1)[0].strip()


def report_url(dest_url: str, dataset: str) -> str:
    """Where the report of ``dataset``'s latest ingest lives: beside the partitions in the dataset root."""
    return storage.join(dest_url, REPORT_DIR, f"{dataset}.json")


def write_report(report: QuarantineReport, dest_url: str) -> str:
    url = report_url(dest_url, report.dataset)
    storage.atomic_write_json(url, report.to_dict())
    return url
