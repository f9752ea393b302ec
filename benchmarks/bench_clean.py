"""Cleaning: exact leave-one-out from one factorisation vs n re-solves; removal curves from one incremental
pass vs a direct solve per curve point; streaming the suspects table.

    python benchmarks/bench_clean.py --n 1000 --m 200 --rank 128

Both sides of each comparison run in this process on the same synthetic kernel and must agree (the script
checks it) before their times are compared.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from freeshap_ray.apps.kernel_baselines import KernelSurrogate
from freeshap_ray.apps.cleaning import write_suspects
from freeshap_ray.apps.curves import curve_sizes, prefix_utilities
from freeshap_ray.utility import RegressionProblem
from freeshap_ray.utility.metrics import accuracy


def problem(n: int, m: int, rank: int, seed: int = 0) -> RegressionProblem:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n + m)
    X = rng.normal(size=(n + m, rank))
    X[:, 0] += np.where(y == 1, 1.5, -1.5)
    K = X @ X.T / rank * 1e4
    return RegressionProblem.from_kernels(K[:n, :n], K[n:, :n], y[:n], y[n:], n_classes=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--m", type=int, default=200)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--resolves", type=int, default=50, help="re-solves actually timed (extrapolated to n)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--stream-rows", type=int, default=300_000)
    a = ap.parse_args()
    p = problem(a.n, a.m, a.rank)

    t = time.perf_counter()
    sur = KernelSurrogate.fit(p)
    loo = sur.loo_values("accuracy")
    t_ours = time.perf_counter() - t
    full = accuracy(p.predict(), p.y_test)
    t = time.perf_counter()
    ref = np.array([full - accuracy(p.predict(np.delete(np.arange(p.n), i)), p.y_test) for i in range(a.resolves)])
    t_ref = (time.perf_counter() - t) * p.n / a.resolves
    assert np.array_equal(ref, loo[: a.resolves]), "LOO mismatch"
    print(f"LOO values, n={p.n}, m={p.m}: one factorisation {t_ours:.2f} s; n re-solves {t_ref:.1f} s "
          f"(extrapolated from {a.resolves}); ratio {t_ref / t_ours:.0f}x")

    order = np.random.default_rng(1).permutation(p.n)
    _, sizes = curve_sizes(p.n, a.steps)
    t = time.perf_counter()
    inc = prefix_utilities(p, order, sizes)
    t_inc = time.perf_counter() - t
    t = time.perf_counter()
    direct = {int(k): accuracy(p.predict(order[:k]), p.y_test) for k in sizes if k > 0}
    t_dir = time.perf_counter() - t
    assert all(abs(inc[k][0] - v) < 1e-12 for k, v in direct.items()), "curve mismatch"
    print(f"one curve ({a.steps} points): incremental pass {t_inc:.2f} s; direct solve per point {t_dir:.2f} s; "
          f"ratio {t_dir / t_inc:.1f}x")

    rows = a.stream_rows
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "train.parquet"
        pq.write_table(pa.table({"index": np.arange(rows), "id": np.arange(rows),
                                 "text": pa.array([f"example text number {i} " * 4 for i in range(rows)])}),
                       src, row_group_size=50_000)
        v = np.random.default_rng(2).normal(size=rows)
        t = time.perf_counter()
        write_suspects(Path(d) / "s.parquet", src, np.argsort(v, kind="stable"),
                       {"label": np.zeros(rows, np.int64), "value": v, "stderr": v, "score": v}, ["a", "b"])
        t_s = time.perf_counter() - t
    print(f"suspects table, {rows:,} rows streamed in rank order: {t_s:.1f} s ({rows / t_s:,.0f} rows/s)")


if __name__ == "__main__":
    main()
