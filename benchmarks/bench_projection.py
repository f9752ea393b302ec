"""Projected eNTK features against the exact kernel: kernel error, surrogate accuracy, values, detection.

On an exact run of the cleaning config (``--run``: a finished ``freeshap-ray run`` output with exact tiles, e.g.
``outputs/bench_estimators_2000`` that ``bench_estimators.py --n 2000`` builds), for every D in ``--dims`` and
every projection seed in ``--seeds`` the projected features φ of the same train and test texts are computed (in
this process, ``--threads`` torch threads) and compared with the exact kernel K:

* ``relF``: ‖K̂ − K‖_F / ‖K‖_F over train×train and test×train (K̂ = ⟨φ, φ'⟩);
* ``acc``: test accuracy of the kernel-regression surrogate fitted on all training points with K̂ (exact: K);
* ``rho``: Spearman of the values with K̂ against the values with K (same estimator, seed and permutations:
  the difference is the kernel's alone);
* ``AUC``/``rec@20%``: wrong-label detection with K̂'s values on 10 % flipped labels (seed 0).

    python benchmarks/bench_projection.py --run outputs/bench_estimators_2000 --dims 512,1024,2048,8192,32768 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--dims", default="512,1024,2048,8192,32768")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--permutations", type=int, default=300)
    ap.add_argument("--utility", default="neg_ce")
    ap.add_argument("--estimator", default="tmc")
    args = ap.parse_args()

    import torch
    from scipy.stats import spearmanr

    import freeshap_ray
    from freeshap_ray.apps.cleaning import inject_noise
    from freeshap_ray.apps.curves import detection_curve, rank_order
    from freeshap_ray.config import config_from_dict
    from freeshap_ray.io import Layout, RunManifest, read_examples, read_kernel
    from freeshap_ray.kernel.worker import KernelWorker
    from freeshap_ray.models import resolve_model_path
    from freeshap_ray.utility import RegressionProblem
    from freeshap_ray.utility.metrics import accuracy

    torch.set_num_threads(args.threads)
    layout = Layout.of(args.run)
    cfg = config_from_dict(RunManifest.read(layout.manifest).config)
    train, test = read_examples(layout, "train"), read_examples(layout, "test")
    texts = {"train": train.column("text").to_pylist(), "test": test.column("text").to_pylist()}
    y, yt = train.column("label").to_numpy(), test.column("label").to_numpy()
    noisy, flipped = inject_noise(y, 0.1, 0, len(cfg.data.label_names))
    exact = read_kernel(layout.root)
    assert exact.kind == "first_logit", "the benchmark compares first-logit kernels"
    sc = cfg.shapley
    kw = dict(lam=sc.lam, kernel_divisor=sc.kernel_divisor, utility=args.utility, estimator=args.estimator,
              n_permutations=args.permutations, truncation_tol=sc.truncation_tol, seed=0, num_cpus_per_task=1.0,
              permutations_per_task=25, convergence="none", max_seconds=None)  # the same samples on every kernel

    def surrogate_acc(k_tt, k_st) -> float:
        prob = RegressionProblem.from_kernels(k_tt, k_st, y, yt, lam=sc.lam, kernel_divisor=sc.kernel_divisor)
        return accuracy(prob.predict(), yt)

    def detect(values) -> tuple[float, float]:
        c = detection_curve(rank_order(values, noisy), flipped)
        return c.auc, c.recall_at(0.2)

    v_exact = freeshap_ray.shapley(exact.train_train, exact.test_train, y, yt, **kw).values
    auc0, rec0 = detect(freeshap_ray.shapley(exact.train_train, exact.test_train, noisy, yt, **kw).values)
    print(f"n = {y.size}, m = {yt.size}, selection {exact.n_params:,} parameters; {args.estimator} x {args.permutations} "
          f"permutations, {args.utility}; torch threads {args.threads}")
    print(f"exact: acc {surrogate_acc(exact.train_train, exact.test_train):.4f}  AUC {auc0:.3f}  rec@20% {rec0:.3f}")
    print(f"{'D':>6s} {'seed':>4s} {'relF':>8s} {'acc':>7s} {'rho':>7s} {'AUC':>6s} {'rec@20%':>7s} {'feat s':>7s}")
    model_dir = resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir, seed=cfg.model.seed)
    k_exact = np.concatenate([exact.train_train, exact.test_train])
    for dim in (int(d) for d in args.dims.split(",")):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            kc = dataclasses.replace(cfg.kernel, projection_dim=dim, projection_seed=seed, num_cpus_per_actor=args.threads,
                                     num_actors=1)
            worker = KernelWorker(model_dir, cfg.model, kc)
            t = time.perf_counter()
            phi = {s: np.concatenate([worker.features(texts[s][i:i + kc.block_size])
                                      for i in range(0, len(texts[s]), kc.block_size)]).astype(np.float64)
                   for s in ("train", "test")}
            secs = time.perf_counter() - t
            k_tt, k_st = phi["train"] @ phi["train"].T, phi["test"] @ phi["train"].T
            rel = float(np.linalg.norm(np.concatenate([k_tt, k_st]) - k_exact) / np.linalg.norm(k_exact))
            acc = surrogate_acc(k_tt, k_st)
            v = freeshap_ray.shapley(k_tt, k_st, y, yt, **kw).values
            rho = float(spearmanr(v, v_exact).statistic)
            auc, rec = detect(freeshap_ray.shapley(k_tt, k_st, noisy, yt, **kw).values)
            rows.append((rel, acc, rho, auc, rec))
            print(f"{dim:6d} {seed:4d} {rel:8.4f} {acc:7.4f} {rho:7.3f} {auc:6.3f} {rec:7.3f} {secs:7.1f}", flush=True)
        m = np.mean(rows, axis=0)
        print(f"{dim:6d} mean {m[0]:8.4f} {m[1]:7.4f} {m[2]:7.3f} {m[3]:6.3f} {m[4]:7.3f}", flush=True)


if __name__ == "__main__":
    main()
