"""Feature shards written from different nodes of a 3-node ``ray.cluster_utils.Cluster`` (three raylets on this
machine, 127.0.0.1): the head (the driver, 1 CPU, no ``feature_slot``), nodes A and B (1 CPU and one custom
``feature_slot`` each). The two feature actors need a ``feature_slot``, so one runs on A and one on B, and each
writes its shards straight to a ``file://`` URI (standing in for shared storage).

The stored matrices equal a single-node run's bit for bit: every shard is computed by the same code from the same
texts with one torch thread on the same CPU type, so the float operations are the same wherever it runs.

The module owns its Ray runtime (as tests/test_multinode.py does): the single-node reference uses the session's
Ray (started if needed), which is shut down for the cluster and started again afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest

from freeshap_ray.config import KernelConfig, ModelConfig
from freeshap_ray.distributed.features_job import compute_features
from freeshap_ray.distributed.kernel_job import KernelInputs
from freeshap_ray.grads import param_sizes
from freeshap_ray.io import FeatureStore
from freeshap_ray.models import load_classifier, resolve_model_path, select_params

from .helpers import TEMPLATES, TEXTS
from .test_multinode import NODE_ARGS

LABELS = {"train": [1, 0, 1, 0, 1, 0], "test": [1, 0, 1]}


def _job(multinode: bool) -> KernelInputs:
    cfg = ModelConfig(path="tiny:llama", template=TEMPLATES["llama"], label_words=("bad", "good"), params="all")
    model_dir = resolve_model_path(cfg.path)
    clf = load_classifier(model_dir, cfg)
    names = select_params(clf, cfg.params)
    kc = KernelConfig(kind="full", num_actors=2, num_cpus_per_actor=0.5, projection_dim=64, feature_shard_rows=1,
                      resources_per_actor={"feature_slot": 1} if multinode else {})
    return KernelInputs(TEXTS[:6], TEXTS[6:], model_dir, cfg, kc, names, param_sizes(clf, names))


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory):
    """(cluster, node A id, node B id, reference store)."""
    import ray
    from ray.cluster_utils import Cluster

    from freeshap_ray.distributed import init_local
    from freeshap_ray.distributed.runtime import _force_loopback

    root = tmp_path_factory.mktemp("features-multinode")
    was_up = ray.is_initialized()
    if not was_up:
        init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ref = FeatureStore(root / "ref")
    compute_features(_job(False), ref, labels=LABELS, progress=False)
    ray.shutdown()
    _force_loopback()
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "num_cpus": 1, "include_dashboard": False})
        node_a = cluster.add_node(**NODE_ARGS, num_cpus=1, resources={"feature_slot": 1})
        node_b = cluster.add_node(**NODE_ARGS, num_cpus=1, resources={"feature_slot": 1})
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
        yield cluster, node_a.node_id, node_b.node_id, ref
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if was_up:
            init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)


def test_shards_from_two_nodes_equal_single_node_run(cluster_env, tmp_path):
    import ray

    _, node_a, node_b, ref = cluster_env
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    store = FeatureStore.of((tmp_path / "run").as_uri())
    stats = compute_features(_job(True), store, labels=LABELS, progress=False)
    assert stats["shards_computed"] == 9  # one example per shard
    assert set(stats["nodes"]) == {node_a, node_b}, stats["nodes"]  # both worker nodes wrote shards, not the head
    assert sum(stats["nodes"].values()) == 9
    for split in ("train", "test"):
        for got, want in zip(store.read_matrix(split), ref.read_matrix(split)):
            np.testing.assert_array_equal(got, want)
