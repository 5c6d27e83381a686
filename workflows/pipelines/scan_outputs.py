"""The on-storage layout of a scan and the reading back of its counts.

Under the scan's output URL, per shard (written by the actor, commit marker last):
  results/category=C/<shard>.parquet   scored images (score, flag, threshold, branch scores, region)
  skipped/category=C/<shard>.parquet   images not scored, with the reason
  maps/category=C/<shard>.parquet      heat-map PNG bytes of the flagged images (+ their overlay's path)
  maps/category=C/<name>.png           overlay of each flagged image, for people (`overlay_name`)
  done/<shard>.json                    commit marker: counts of the shard and the run that scored it
A rerun skips every shard with a marker and rewrites the others under the same names (overlay names
depend only on the image), so an image is never counted twice and no overlay is duplicated.
`plan/` holds the shard plan, `calibration.json` the thresholds,
`summary.json` the totals, `_SUCCESS` marks a finished scan.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from workflows import storage
from workflows.pipelines.commits import CommitStore

TABLES = ("results", "skipped", "maps")
UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")  # anything else in a name part becomes "_"
NAME_STEM_CHARS = 100  # keeps the name well under every filesystem's 255-byte limit
NAME_HASH_CHARS = 10  # 40 bits of sha256: unique among millions of images of a category


def overlay_name(source: str, image_id: str | None) -> str:
    """A filesystem-safe, unique file name for an image's overlay: its relative path with the
    directories joined by "__", the extension dropped, characters outside [A-Za-z0-9_-] replaced by "_"
    (so no "/", "..", or hidden name), cut to NAME_STEM_CHARS, then "-" and a hash of the source and
    image id (two paths that clean to the same stem stay apart), and ".png".
    `brick/003/img 7.JPG` -> `brick__003__img_7-<hash>.png`."""
    parts = [p for p in re.split(r"[/\\]+", source or "") if p not in ("", ".", "..")]
    if parts:
        parts[-1] = parts[-1].rsplit(".", 1)[0] if "." in parts[-1].lstrip(".") else parts[-1]
    cleaned = [UNSAFE.sub("_", p).strip("_") for p in parts]
    stem = "__".join(p for p in cleaned if p)[:NAME_STEM_CHARS] or "image"
    digest = hashlib.sha256(f"{source}\0{image_id or ''}".encode()).hexdigest()[:NAME_HASH_CHARS]
    return f"{stem}-{digest}.png"


class ScanStore(CommitStore):
    """A scan's per-shard tables by category (the commit layer is `commits.CommitStore`)."""

    def table_url(self, table: str, category: str, shard_id: str) -> str:
        return storage.join(self.url, table, f"category={category}", f"{shard_id}.parquet")

    def overlay_path(self, category: str, name: str) -> str:
        """An overlay's path relative to the scan's output (what the maps table records)."""
        return f"maps/category={category}/{name}"

    def commit(self, category: str, shard_id: str, tables: dict[str, pa.Table], marker: dict,
               files: dict[str, bytes] | None = None) -> None:
        """Write the shard's non-empty tables and its files (relative path -> bytes: the overlays), each
        atomically, then its commit marker (last)."""
        for name, table in tables.items():
            if table is not None and table.num_rows:
                self.write_parquet(self.table_url(name, category, shard_id), table)
        for path, data in (files or {}).items():
            storage.atomic_write_bytes(storage.join(self.url, path), data)
        self.commit_marker(shard_id, marker)

    def markers(self, shard_ids: list[str] | None = None, threads: int = 16) -> list[dict]:
        """Commit markers (small JSON) of the given or all done shards, read in parallel."""
        ids = sorted(shard_ids if shard_ids is not None else self.done_ids())
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.marker, ids))

    def read_table(self, table: str, category: str | None = None,
                   columns: list[str] | None = None) -> pa.Table:
        """One output table (all categories, or one) from the committed shards; for tests and small scans."""
        done = self.done_ids()
        base = storage.join(self.url, table) if category is None else storage.join(self.url, table,
                                                                                    f"category={category}")
        urls = [u for u in storage.list_urls(base, recursive=True)
                if u.endswith(".parquet") and u.rsplit("/", 1)[-1].removesuffix(".parquet") in done]
        parts = [self.read_parquet(u, columns) for u in sorted(urls)]
        if not parts:
            return pa.table({})
        return pa.concat_tables(parts, promote_options="default")


def summarize(markers: list[dict]) -> dict:
    """Totals and per-category counts from commit markers; `seen == scored + skipped` by construction
    of each marker, checked again here."""
    per_category: dict[str, Counter] = {}
    reasons: Counter = Counter()
    by_run: dict[str, Counter] = {}
    for marker in markers:
        counts = per_category.setdefault(marker["category"], Counter())
        for key in ("seen", "scored", "skipped", "flagged"):
            counts[key] += int(marker[key])
        reasons.update(marker.get("skip_reasons", {}))
        run = by_run.setdefault(marker["run_id"], Counter())
        run["shards"] += 1
        run["images"] += int(marker["seen"])
    totals = Counter()
    for counts in per_category.values():
        totals.update(counts)
    totals = {key: int(totals.get(key, 0)) for key in ("seen", "scored", "skipped", "flagged")}
    return {
        **totals,
        "flagged_fraction": totals["flagged"] / totals["scored"] if totals["scored"] else 0.0,
        "reconciles": totals["seen"] == totals["scored"] + totals["skipped"],
        "per_category": {name: {**{k: int(v) for k, v in c.items()},
                                "flagged_fraction": c["flagged"] / c["scored"] if c["scored"] else 0.0}
                         for name, c in sorted(per_category.items())},
        "skip_reasons": dict(sorted(reasons.items())),
        "shards": len(markers),
        "by_run": {run: dict(c) for run, c in by_run.items()},
    }


def reason_key(reason: str) -> str:
    """A short class of a skip reason for counting ('too large', 'empty input', ...)."""
    return reason.split(":", 1)[0].split("(", 1)[0].strip()[:60]
