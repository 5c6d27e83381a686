"""Reports of one evaluation job: per category ``curves/<stem>_roc.png``, ``curves/<stem>_pro.png``
(when masks exist) and ``gallery/<stem>.png``, written to a local directory;
``workflows.tracking.log_evaluation_reports`` logs them to the active MLflow run.
``<stem>`` is the category, prefixed by its dataset when two datasets share a category name.

Categories are handled one at a time, so the driver holds one category's merged metric state and at
most one gallery's maps and images at once.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

from workflows.pipelines.shards import Shard
from workflows.reports import job_outputs
from workflows.reports.curves import write_category_curves
from workflows.reports.gallery import GalleryTile, plot_gallery
from workflows.reports.job_maps import RECOMPUTED, STORED, ShownMaps, gallery_maps
from workflows.reports.selection import (
    GROUPS,
    LOW_ANOMALIES,
    TYPICAL_ANOMALIES,
    Candidate,
    GallerySelector,
    candidates_from_table,
)

NO_MAPS_NOTE = ("No anomaly maps for these images: neither stored (evaluate.save_maps) nor recomputable "
                "({why}). Images only, chosen by image score.")
@dataclass
class CategoryReport:
    """Files written for one "dataset/category" and, per figure left out, the reason."""

    name: str
    stem: str
    files: dict[str, str] = field(default_factory=dict)  # artifact path -> local file
    missing: dict[str, str] = field(default_factory=dict)  # figure -> reason
    gallery_images: dict[str, list[str]] = field(default_factory=dict)  # group -> image ids
    map_sources: dict[str, str] = field(default_factory=dict)  # shown image id -> "stored" | "recomputed"


def artifact_stems(names: list[str]) -> dict[str, str]:
    """"dataset/category" -> file-name stem: the category, or "dataset_category" when ambiguous."""
    categories = [name.split("/", 1)[1] for name in names]

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", text)

    return {name: clean(name.split("/", 1)[1] if categories.count(name.split("/", 1)[1]) == 1
                        else name.replace("/", "_")) for name in names}


def select_gallery(job_url: str, shards: list[Shard], per_group: int) -> tuple[dict[str, list[Candidate]],
                                                                               int]:
    """Stream the category's per-image results shard by shard; returns (groups, images considered).

    Every scored image of the job is a candidate, whether or not its map was stored: the extremes are
    the run's true extremes (their maps are recomputed when not stored, see `job_maps`)."""
    selector = GallerySelector(per_group=per_group)
    for shard in shards:
        selector.add(candidates_from_table(job_outputs.read_results(job_url, shard), shard.shard_id))
    return selector.select(), selector.seen


def _caption(candidate: Candidate) -> str:
    name = "/".join(candidate.source.split("/")[-2:]) if candidate.source else candidate.image_id[:12]
    kind = "normal" if candidate.label == 0 else (candidate.defect_type or "anomalous")
    return f"{name[:22]} · {kind[:14]}\nscore {candidate.score:.4g}"


def gallery_tiles(job_url: str, shards: list[Shard], groups: dict[str, list[Candidate]],
                  scorers: dict | None = None) -> tuple[dict[str, list[GalleryTile]], ShownMaps]:
    """The chosen images' maps (stored, else recomputed) and originals (one shard at a time) as tiles;
    originals are shown as the job's preprocessing preset showed them to the model."""
    by_id = {s.shard_id: s for s in shards}
    preprocess = job_outputs.job_preprocess(job_url)
    chosen: dict[str, list[str]] = {}
    for members in groups.values():
        for candidate in members:
            chosen.setdefault(candidate.shard_id, []).append(candidate.image_id)
    shown = gallery_maps(job_url, by_id, chosen, scorers)
    size = next(iter(shown.maps.values())).shape if shown.maps else None
    originals = {}
    for shard_id, ids in sorted(chosen.items()):
        try:
            originals.update(job_outputs.load_originals(by_id[shard_id], ids, size, preprocess))
        except Exception as exc:  # noqa: BLE001 - the dataset may have moved; maps alone still help
            warnings.warn(f"gallery: originals of shard {shard_id} unreadable ({exc}); maps only",
                          stacklevel=2)
    tiles = {}
    for group, members in groups.items():
        tiles[group] = []
        for candidate in members:
            image, mask = originals.get(candidate.image_id, (None, None))
            tiles[group].append(GalleryTile(image, shown.maps.get(candidate.image_id), mask,
                                            _caption(candidate)))
    return tiles, shown


def _map_notes(shown: ShownMaps, tiles: dict[str, list[GalleryTile]]) -> list[str]:
    """What the notes say about where the maps came from, and why some tiles have none."""
    sources = list(shown.sources.values())
    notes = []
    if sources:
        notes.append(f"Maps: {sources.count(STORED)} stored by the run, {sources.count(RECOMPUTED)} "
                     "recomputed for this gallery (same model, references and normalisation).")
    without = sum(t.anomaly_map is None for members in tiles.values() for t in members)
    if without and not sources:
        notes.append(NO_MAPS_NOTE.format(why="; ".join(shown.problems) or "no scoring setup recorded"))
    elif without:
        notes.append(f"{without} tile(s) without a map: {'; '.join(shown.problems) or 'not found'}.")
    return notes


def write_category_reports(job_url: str, name: str, shards: list[Shard], out_dir: str, stem: str,
                           title: str = "", per_group: int = 4,
                           scorers: dict | None = None) -> CategoryReport:
    """Curves and gallery of one category into ``out_dir/curves`` and ``out_dir/gallery``."""
    report = CategoryReport(name, stem)
    heading = f"{name} · {title}" if title else name
    curve_files = write_category_curves(job_outputs.merged_accumulator(job_url, shards), heading,
                                        os.path.join(out_dir, "curves"), stem)
    for path in (curve_files.roc_png, curve_files.pro_png):
        if path:
            report.files[f"curves/{os.path.basename(path)}"] = path
    report.missing.update(curve_files.missing)
    groups, seen = select_gallery(job_url, shards, per_group)
    report.gallery_images = {group: [c.image_id for c in members] for group, members in groups.items()}
    tiles, shown = gallery_tiles(job_url, shards, groups, scorers)
    report.map_sources = dict(shown.sources)
    notes = [f"Chosen among all {seen} scored images of the run; typical = closest to the class's median "
             "score.", *_map_notes(shown, tiles)]
    anomalous_tiles = [t for group in (LOW_ANOMALIES, TYPICAL_ANOMALIES) for t in tiles[group]]
    if anomalous_tiles and not any(t.mask is not None for t in anomalous_tiles):
        notes.append("No defect outlines: these images have no ground-truth masks.")
    kind = "Anomaly maps" if shown.maps else "Images by score"
    path = plot_gallery([(group, tiles[group]) for group in GROUPS], f"{kind} — {heading}",
                        os.path.join(out_dir, "gallery", f"{stem}.png"), notes)
    report.files[f"gallery/{stem}.png"] = path
    return report


def write_evaluation_reports(job_url: str, out_dir: str, *, per_group: int = 4) -> list[CategoryReport]:
    """Reports of every category of a committed evaluation job."""
    grouped = job_outputs.shards_by_category(job_url)
    stems = artifact_stems(list(grouped))
    title = job_outputs.job_title(job_url)
    scorers: dict = {}  # one model load for every category's recomputed maps
    return [write_category_reports(job_url, name, shards, out_dir, stems[name], title, per_group, scorers)
            for name, shards in grouped.items()]

