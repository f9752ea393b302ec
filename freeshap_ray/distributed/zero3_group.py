"""``kernel.backend: deepspeed``: the kernel actors form one DeepSpeed ZeRO-3 group (one torch.distributed
process group, gloo on CPU, nccl on GPU), so the model is partitioned across them.

Rank r is actor r, placed in bundle r of the kernel's placement group. Rank 0's node gives the rendezvous
(``MASTER_ADDR`` = its node IP, ``MASTER_PORT`` = a port found free there); every actor gets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` — as Ray Train sets them, except that ``LOCAL_RANK`` is the device index
the rank uses: 0 on GPU, where Ray shows each actor only its own GPU.

Each rank is its own parameter shard: the kernel job calls ``jacobian`` on EVERY rank for every block, in
the same order (the driver submits all calls; Ray runs a synchronous actor's calls from one submitter in
submission order, and these actors are never retried), and sums the ranks' partial tiles.

A rank that dies cannot rejoin its process group, so the group is never restarted: the first failure
stops every rank and the job fails with :class:`Zero3GroupError`; finished tiles are on disk and a rerun
resumes from them.
"""

from __future__ import annotations

import socket
from pathlib import Path

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import KernelConfig, ModelConfig
from ..kernel.zero3 import Rank, Zero3KernelWorker

__all__ = ["Zero3GroupError", "make_zero3_actors", "stop_group"]


class Zero3GroupError(RuntimeError):
    """A rank of the ZeRO-3 kernel group failed; the whole group was stopped."""


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """This node's IP and a port that is free on it now (for rank 0's TCP store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), int(port)


def make_zero3_actors(model_dir: Path, model_cfg: ModelConfig, cfg: KernelConfig, pg) -> list:
    """Start ``cfg.num_actors`` ranks of one ZeRO-3 group, rank r in bundle r of ``pg``.

    The actors' constructors rendezvous with each other, so they must all be able to start at once —
    which the (already ready) placement group guarantees.
    """
    if pg is None:  # guarded by KernelConfig; a group needs every rank placed before any can start
        raise ValueError("kernel.placement: the deepspeed backend needs a placement group")
    master_addr, master_port = ray.get(
        _rendezvous.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
        .remote()
    )
    actor_cls = ray.remote(
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
        resources={k: v for k, v in cfg.resources_per_actor.items() if v} or None,
        max_restarts=0,  # a restarted rank cannot rejoin the process group
        max_task_retries=0,  # and retried calls could reorder collectives
    )(Zero3KernelWorker)
    actors = []
    for rank in range(cfg.num_actors):
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
        actors.append(actor_cls.options(scheduling_strategy=strategy).remote(
            str(model_dir), model_cfg, cfg, Rank(rank, cfg.num_actors, master_addr, master_port)))
    return actors


def stop_group(err: BaseException, actors: list, pg) -> Zero3GroupError:
    """Kill every rank (the survivors may be blocked in a collective) and release the placement group;
    returns the error to raise."""
    for a in actors:
        ray.kill(a, no_restart=True)
    if pg is not None:
        remove_placement_group(pg)
    first = str(err).strip().splitlines()
    return Zero3GroupError(
        "kernel.backend=deepspeed: a rank of the ZeRO-3 group failed, so the whole group was stopped (a rank "
        "cannot rejoin its torch.distributed group). Finished tiles are kept; rerun the same command to resume "
        f"from them. Cause: {type(err).__name__}: {first[0] if first else ''}"
    )
