"""When to stop sampling: convergence criteria evaluated on the running estimates.

* ``none``: run the whole permutation budget (or until the time budget).
* ``stderr``: stop once ``max_i stderr_i <= tol * (max_i value_i - min_i value_i)``, i.e. the worst
  standard error is a small fraction of the spread of the values.
* ``rank``: stop once the sets of the ``top_k`` highest and ``top_k`` lowest valued points have not
  changed for ``patience`` consecutive checks (one check per finished batch).

No criterion fires before ``min_samples`` samples per point. The permutation budget and the time
budget are enforced by the driver, whichever comes first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..values import ValuesResult

__all__ = ["CRITERIA", "StoppingRule"]

CRITERIA = ("none", "stderr", "rank")


@dataclass
class StoppingRule:
    """A convergence criterion with the state it needs between checks (its settings are validated by the
    ``shapley`` config section it is built from: :meth:`ValuationSettings.stopping_rule`).

    Attributes:
        criterion: ``none``, ``stderr`` or ``rank``.
        tol: for ``stderr``: the largest accepted ``max stderr / value spread``.
        top_k: for ``rank``: size of the top and bottom sets (capped at ``n // 2``).
        patience: for ``rank``: consecutive unchanged checks needed.
        min_samples: no criterion fires before every point has this many samples.
    """

    criterion: str = "none"
    tol: float = 0.05
    top_k: int = 10
    patience: int = 3
    min_samples: int = 10
    _last: tuple | None = field(default=None, init=False, repr=False)
    _streak: int = field(default=0, init=False, repr=False)
    last_metric: float = field(default=float("nan"), init=False)

    def check(self, values: ValuesResult) -> str | None:
        """Update with the current estimates; return a reason string once converged, else None."""
        if self.criterion == "none":
            return None
        v = np.asarray(values.values, dtype=np.float64)
        if v.ndim != 1:
            raise ValueError("convergence: expects overall values of shape (n,)")
        if values.counts.size == 0:
            return None
        enough = int(values.counts.min()) >= self.min_samples
        if self.criterion == "stderr":
            spread = float(v.max() - v.min())
            worst = float(np.max(values.stderr))
            self.last_metric = worst / spread if spread > 0 else (0.0 if worst == 0 else float("inf"))
            if enough and self.last_metric <= self.tol:
                return f"converged: max stderr / value spread = {self.last_metric:.4g} <= {self.tol:g}"
            return None
        k = max(1, min(self.top_k, v.size // 2))
        order = np.argsort(v, kind="stable")
        key = (frozenset(order[:k].tolist()), frozenset(order[-k:].tolist()))
        self._streak = self._streak + 1 if key == self._last else 0
        self._last = key
        self.last_metric = float(self._streak)
        if enough and self._streak >= self.patience:
            return f"converged: top/bottom {k} sets unchanged for {self._streak} checks"
        return None
