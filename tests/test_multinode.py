"""The kernel and Shapley stages on a 3-node Ray cluster (``ray.cluster_utils.Cluster``: three raylets on
this machine, all on 127.0.0.1), with a custom resource ``gpu_like`` standing in for GPUs: the head has
none (the driver), node A has one, node B two.

Every result is compared with a local single-node run of the same config: the kernel to <= 1e-10 relative,
the Shapley values exactly (same seeds). Faults: a kernel actor killed, then the node hosting another kernel
actor removed from the cluster, both mid-run.

The module owns its Ray runtime: a session Ray that earlier tests started (``ray_local``) is used for the
single-node reference, shut down, and started again with the same settings when the module is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from freeshap_ray.config import config_from_dict
from freeshap_ray.io import load_kernel

from .helpers import LABELS, TEXTS, write_csv

N_TRAIN = 6  # TEXTS[:6] train, TEXTS[6:] test; blocks of 2 -> 6 train x train + 6 test x train tiles
N_TILES = 12
NODE_ARGS = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}


@dataclass
class Env:
    cluster: object
    head: str  # node ids
    node_a: str  # gpu_like: 1
    node_b: str  # gpu_like: 2
    csvs: tuple[str, str]
    ref: Path  # output of the local single-node run


def job_config(csvs, out: Path, *, multinode: bool = True):
    return config_from_dict({
        "data": {"train": csvs[0], "test": csvs[1]},
        "model": {"path": "tiny:llama", "template": "{text} sentiment :", "label_words": ["bad", "good"],
                  "params": "all"},
        # two actors, each owning one of two parameter shards; SPREAD puts them on different nodes
        "kernel": {"block_size": 2, "num_actors": 2, "num_cpus_per_actor": 0.5, "param_shards": 2,
                   "max_restarts": 2, "placement": "SPREAD" if multinode else "PACK",
                   "resources_per_actor": {"gpu_like": 1} if multinode else {}},
        "shapley": {"n_permutations": 24, "permutations_per_task": 2, "num_cpus_per_task": 1, "utility": "neg_ce",
                    "seed": 3, "lam": 1e-3, "sign_splits": 10, "estimator": "tmc", "convergence": "none", "placement": "SPREAD" if multinode else "DEFAULT",
                    "resources_per_task": {"gpu_like": 1} if multinode else {}},
        "output": str(out),
    })


def run_stages(cfg, *, on_tile=None, shapley: bool = True):
    from freeshap_ray.pipeline import prepare_kernel_stage, run_kernel_stage, run_shapley_stage

    kernel = run_kernel_stage(prepare_kernel_stage(cfg), progress=False, on_tile=on_tile)
    values = run_shapley_stage(cfg, progress=False) if shapley else None
    return kernel, values


def assert_kernel_equals_ref(out: Path, ref: Path) -> None:
    got, want = load_kernel(out), load_kernel(ref)
    for key in ("train_train", "test_train"):
        assert got[key].shape == want[key].shape
        assert np.abs(got[key] - want[key]).max() <= 1e-10 * np.abs(want[key]).max(), key


def wait_for_idle_cluster(timeout: float = 60.0) -> None:
    """Wait until every CPU and ``gpu_like`` of the cluster is free again. Resources of an earlier test's
    actors and tasks are released asynchronously; a placement group created before that sees a busy node, and
    SPREAD (best effort) then packs both bundles onto the other node."""
    import time

    import ray

    total = ray.cluster_resources()
    deadline = time.monotonic() + timeout
    while True:
        free = ray.available_resources()
        if all(free.get(k, 0.0) >= total.get(k, 0.0) - 1e-9 for k in ("CPU", "gpu_like")):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster not idle after {timeout} s: free {free}, total {total}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    from freeshap_ray.distributed import init_local
    from freeshap_ray.distributed.runtime import _force_loopback

    root = tmp_path_factory.mktemp("multinode")
    csvs = (write_csv(root / "train.csv", TEXTS[:N_TRAIN], LABELS[:N_TRAIN]),
            write_csv(root / "test.csv", TEXTS[N_TRAIN:], LABELS[N_TRAIN:]))
    # 1. the local single-node reference (on the session's Ray if one is up)
    was_up = ray.is_initialized()
    if not was_up:
        init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_stages(job_config(csvs, root / "ref", multinode=False))
    ray.shutdown()
    # 2. the cluster. Loopback everywhere: without this the driver resolves 127.0.0.1 to the machine's
    # address, where the GCS does not listen. Results over 1 kB go to the object store of the node that made
    # them (as a real model's Jacobian blocks do) instead of inline to the driver, so removing a node loses
    # the blocks it computed.
    _force_loopback()
    head_args = {**NODE_ARGS, "num_cpus": 1, "include_dashboard": False,
                 "_system_config": {"max_direct_call_object_size": 1024}}
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head_args)
        node_a = cluster.add_node(**NODE_ARGS, num_cpus=1, resources={"gpu_like": 1})
        node_b = cluster.add_node(**NODE_ARGS, num_cpus=1, resources={"gpu_like": 2})
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
        yield Env(cluster, cluster.head_node.node_id, node_a.node_id, node_b.node_id, csvs, root / "ref")
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if was_up:  # give later tests the session runtime back
            init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)


def test_cluster_has_three_loopback_nodes(env):
    import ray

    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert set(nodes) == {env.head, env.node_a, env.node_b}
    assert {n["NodeManagerAddress"] for n in nodes.values()} == {"127.0.0.1"}
    assert [nodes[i]["Resources"].get("gpu_like", 0) for i in (env.head, env.node_a, env.node_b)] == [0, 1, 2]
    assert ray.get_runtime_context().get_node_id() == env.head  # the driver is on the head


def test_kernel_and_shapley_spread_over_nodes_equal_local_run(env, tmp_path):
    """Kernel actors need ``gpu_like`` and are SPREAD: one on node A, one on node B. Shapley tasks need
    ``gpu_like`` too (and a whole CPU: one at a time per node), so they run on nodes A and B, never on the head.
    Kernel and values equal the single-node run's."""
    out = tmp_path / "out"
    wait_for_idle_cluster()
    kernel, values = run_stages(job_config(env.csvs, out))
    assert sorted(kernel["actor_nodes"]) == sorted([env.node_a, env.node_b])
    assert kernel["tiles_computed"] == N_TILES
    assert_kernel_equals_ref(out, env.ref)
    assert set(values["task_nodes"]) == {env.node_a, env.node_b}, values["task_nodes"]
    assert sum(values["task_nodes"].values()) == 12  # 24 permutations, 2 per task
    got, want = pq.read_table(out / "values.parquet"), pq.read_table(env.ref / "values.parquet")
    for col in ("value", "stderr", "count"):
        np.testing.assert_array_equal(got.column(col).to_numpy(), want.column(col).to_numpy())
    perm_ids = pq.read_table(out / "shapley" / "marginals").column("perm_id").to_pylist()
    assert sorted(perm_ids) == list(range(24))


def test_kernel_survives_actor_kill_and_node_removal(env, tmp_path):
    """After the first tile the actor on node B is killed (restarted in place: max_restarts; its unfinished
    calls are redone). After the third tile node A, hosting the other actor, is removed from the cluster: that
    actor is restarted on node B's second gpu_like (its placement bundle is rescheduled there) and the Jacobian
    blocks lost with node A are recomputed by Ray (lineage reconstruction of the actor calls that made them).
    The kernel is unchanged. Runs last: it shrinks the cluster."""
    import ray

    from freeshap_ray.distributed.kernel_job import actor_nodes

    events = []

    def faults(actors, written):
        if written == 1:
            nodes = actor_nodes(actors)
            assert sorted(nodes) == sorted([env.node_a, env.node_b])
            ray.kill(actors[nodes.index(env.node_b)], no_restart=False)
            events.append(("killed actor", nodes.index(env.node_b)))
        elif written == 3:
            node = next(n for n in env.cluster.worker_nodes if n.node_id == env.node_a)
            env.cluster.remove_node(node)
            events.append(("removed node", env.node_a))

    out = tmp_path / "out"
    wait_for_idle_cluster()
    kernel, _ = run_stages(job_config(env.csvs, out), on_tile=faults, shapley=False)
    assert [e[0] for e in events] == ["killed actor", "removed node"]
    assert kernel["actor_nodes"] == [env.node_b, env.node_b]
    assert kernel["tiles_computed"] == N_TILES
    assert_kernel_equals_ref(out, env.ref)


@pytest.mark.parametrize("section,key", [("kernel", "resources_per_actor"), ("shapley", "resources_per_task")])
def test_custom_resource_keys_are_validated(section, key):
    """No Ray needed: mappings of non-negative amounts; built-in resources have their own keys."""
    from freeshap_ray.config import apply_overrides
    from freeshap_ray.errors import ConfigError

    cfg = config_from_dict(apply_overrides({}, [f"{section}.{key}={{gpu_like: 2}}"]))
    assert getattr(getattr(cfg, section), key) == {"gpu_like": 2.0}
    for bad, needle in (({"GPU": 1}, f"{section}.{key}.GPU: a built-in Ray resource"),
                        ({"gpu_like": -1}, f"{section}.{key}.gpu_like: must be a number >= 0"),
                        ({"gpu_like": "one"}, f"{section}.{key}.gpu_like: expected a number"),
                        ([1], f"{section}.{key}: expected a mapping")):
        with pytest.raises(ConfigError, match=needle):
            config_from_dict({section: {key: bad}})
    with pytest.raises(ConfigError, match="shapley.placement: must be one of"):
        config_from_dict({"shapley": {"placement": "PACK"}})
