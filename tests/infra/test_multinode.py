"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a head and two worker nodes) runs
`evaluate` with actors spread over the nodes and gets the same results as a single-node run."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from tests.faults.helpers import assert_same_metrics, assert_same_results, config, result_rows  # noqa: E402
from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from workflows.pipelines.evaluate import run_evaluate  # noqa: E402

pytestmark = pytest.mark.timeout(900)
SETTINGS = ("data.datasets=[textures,labels]", "evaluate.shard_size=3")


def test_three_node_cluster_matches_single_node(tmp_path):
    from ray.cluster_utils import Cluster

    data = write_tiny(str(tmp_path / "data"), n_train=2, n_normal=2, n_anomalous=2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        (multi,) = run_evaluate(config(data, str(tmp_path / "multi"), *SETTINGS, "evaluate.num_actors=2"),
                                progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        (single,) = run_evaluate(config(data, str(tmp_path / "single"), *SETTINGS), progress=False)
    finally:
        ray.shutdown()
    assert multi.completed and single.completed and multi.counts == single.counts
    assert_same_results(result_rows(multi.job_url), result_rows(single.job_url))
    assert_same_metrics(multi.per_category, single.per_category)
