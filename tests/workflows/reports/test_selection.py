"""Gallery selection: exact extremes, typical cases near the median, independent of how rows arrive."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from workflows.reports.selection import (
    HIGH_NORMALS,
    LOW_ANOMALIES,
    TYPICAL_ANOMALIES,
    TYPICAL_NORMALS,
    Candidate,
    GallerySelector,
    candidates_from_table,
)


def _candidates(n_normal: int = 30, n_anomalous: int = 20) -> list[Candidate]:
    normals = [Candidate(f"n{i:03d}", 0, float(i), "s") for i in range(n_normal)]
    anomalies = [Candidate(f"a{i:03d}", 1, 10.0 + i, "s") for i in range(n_anomalous)]
    return normals + anomalies


def _ids(groups, name):
    return [c.image_id for c in groups[name]]


def test_picks_highest_normals_lowest_anomalies_and_typical_cases():
    selector = GallerySelector(per_group=3)
    selector.add(_candidates())
    groups = selector.select()
    assert _ids(groups, HIGH_NORMALS) == ["n029", "n028", "n027"]
    assert _ids(groups, LOW_ANOMALIES) == ["a000", "a001", "a002"]
    # medians 14.5 and 19.5; equally close candidates are broken by image id
    assert _ids(groups, TYPICAL_NORMALS) == ["n013", "n014", "n015"]
    assert _ids(groups, TYPICAL_ANOMALIES) == ["a008", "a009", "a010"]
    assert selector.seen == 50


def test_selection_does_not_depend_on_arrival_order_or_batches():
    reference = GallerySelector(per_group=4)
    reference.add(_candidates())
    shuffled = _candidates()
    random.Random(1).shuffle(shuffled)
    streamed = GallerySelector(per_group=4)
    for start in range(0, len(shuffled), 7):
        streamed.add(shuffled[start:start + 7])
    assert streamed.select() == reference.select()


def test_typical_pool_is_bounded_and_excludes_the_extremes():
    selector = GallerySelector(per_group=2, pool_size=16)
    for start in range(0, 1000, 100):
        selector.add([Candidate(f"n{i:04d}", 0, float(i), "s") for i in range(start, start + 100)])
    assert len(selector._pools[0]) == 16
    groups = selector.select()
    assert _ids(groups, HIGH_NORMALS) == ["n0999", "n0998"]
    assert groups[LOW_ANOMALIES] == [] and groups[TYPICAL_ANOMALIES] == []
    assert not set(_ids(groups, TYPICAL_NORMALS)) & {"n0999", "n0998"}
    assert all(100 < c.score < 900 for c in groups[TYPICAL_NORMALS])  # near the median of a random pool


def test_candidates_skip_unscored_unlabelled_and_mapless_rows():
    table = pa.table({
        "image_id": ["a", "b", "c", "d", "e"],
        "label": pa.array([0, 1, None, 1, 0], pa.int8()),
        "image_score": pa.array([0.1, 0.9, 0.5, None, float("nan")], pa.float32()),
        "status": ["scored", "scored", "scored", "skipped", "scored"],
        "source": ["x/a.png", "x/b.png", "x/c.png", "x/d.png", "x/e.png"],
    })
    found = candidates_from_table(table, "shard1")
    assert [(c.image_id, c.label, c.source, c.shard_id) for c in found] == [
        ("a", 0, "x/a.png", "shard1"), ("b", 1, "x/b.png", "shard1")]
    assert [c.image_id for c in candidates_from_table(table, "shard1", with_maps={"b"})] == ["b"]
    with pytest.raises(ValueError, match="per_group"):
        GallerySelector(per_group=0)
