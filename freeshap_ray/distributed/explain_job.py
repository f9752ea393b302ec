"""Kernel rows of new texts on Ray: kernel actors compute gradient blocks and tiles, as in the kernel job (or,
for a projected run, the texts' projected features).

:class:`RayKernelRows` keeps the signature of the in-process computation
(:func:`freeshap_ray.kernel.rows.kernel_rows`) and gives the same rows: each block of new texts gets its
gradient block from one actor, which then computes its tiles against every training block (put in the
object store once). The actors are :class:`~freeshap_ray.kernel.worker.KernelWorker` actors over the whole
parameter selection: ones the caller passes (reused, never killed here) or ``num_actors`` started here
(with the kernel config's resources) and killed by :meth:`RayKernelRows.close`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray

from ..config import KernelConfig, ModelConfig
from ..errors import ConfigError
from ..kernel.plan import blocks
from ..kernel.rows import Block, TrainFeatures
from ..kernel.worker import KernelWorker

__all__ = ["RayKernelRows", "ray_is_up"]


def ray_is_up() -> bool:
    """Whether Ray is initialised in this process."""
    return ray.is_initialized()


def _names(worker: KernelWorker, spec: str) -> tuple[list[str], list[str]]:
    """(the parameters the actor differentiates, the whole selection ``spec`` of its model)."""
    from ..models import select_params

    return list(worker.names), select_params(worker.clf, spec)


class RayKernelRows:
    """Kernel rows on kernel actors.

    Args:
        model_dir, model_cfg, kernel_cfg: the run's model and kernel settings.
        actors: KernelWorker actor handles of the run's model over its whole ``model.params`` selection (reused;
            checked); None starts ``num_actors``.
        num_actors: actors to start when none are given.
    """

    def __init__(self, model_dir: str | Path, model_cfg: ModelConfig, kernel_cfg: KernelConfig, *,
                 actors: list | None, num_actors: int = 1):
        self.kernel_cfg = kernel_cfg
        self.owned = actors is None
        if actors is None:
            cls = ray.remote(num_cpus=kernel_cfg.num_cpus_per_actor, num_gpus=kernel_cfg.num_gpus_per_actor,
                             resources={k: v for k, v in kernel_cfg.resources_per_actor.items() if v} or None,
                             max_restarts=kernel_cfg.max_restarts,
                             max_task_retries=kernel_cfg.max_restarts)(KernelWorker)
            actors = [cls.remote(str(model_dir), model_cfg, kernel_cfg) for _ in range(num_actors)]
        if not actors:
            raise ConfigError("actors: give at least one kernel actor (or None to start them)")
        held = ray.get([a.__ray_call__.remote(_names, model_cfg.params) for a in actors])
        for i, (got, selection) in enumerate(held):
            if got != selection:
                raise ConfigError(f"actors[{i}]: differentiates {len(got)} of the {len(selection)} parameters of "
                                  "model.params (give KernelWorker actors over the whole selection: param_names=None)")
        self.actors = list(actors)
        self.train_refs: list[ray.ObjectRef] = []

    def gradient_blocks(self, texts: list[list[str]]) -> Iterator[tuple[int, Block]]:
        """Gradient blocks of several lists of texts, spread over the actors, yielded as they finish."""
        refs = {self.actors[i % len(self.actors)].jacobian.remote(list(t)): i for i, t in enumerate(texts)}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            yield refs.pop(done[0]), ray.get(done[0])

    def use_train(self, train: TrainFeatures) -> None:
        """Put the training blocks in the object store (once); rows are computed against them."""
        self.bounds = train.bounds
        self.train_refs = [ray.put(train.block(b)) for b in range(len(train.bounds))]

    def rows(self, texts: list[str]) -> np.ndarray:
        """``(m, n)`` or ``(m, n, C, C)`` float64 kernel rows of ``texts`` (as :func:`kernel_rows`)."""
        cfg = self.kernel_cfg
        out = []
        for i, (start, stop) in enumerate(blocks(len(texts), cfg.block_size)):
            actor = self.actors[i % len(self.actors)]
            ja = actor.jacobian.remote(list(texts[start:stop]))
            out.append([actor.tile.remote(ja, ref, cfg.chunk_params) for ref in self.train_refs])
        return np.concatenate([np.concatenate(ray.get(refs), axis=1) for refs in out], axis=0)

    def features(self, texts: list[str]) -> np.ndarray:
        """``(m·C', D)`` float32 projected features of ``texts`` (blocks spread over the actors)."""
        refs = [self.actors[i % len(self.actors)].features.remote(list(texts[a:b]))
                for i, (a, b) in enumerate(blocks(len(texts), self.kernel_cfg.block_size))]
        return np.concatenate(ray.get(refs))

    def close(self) -> None:
        """Kill the actors started here (actors passed in are left running)."""
        if self.owned:
            for a in self.actors:
                ray.kill(a, no_restart=True)
        self.actors, self.train_refs = [], []
