"""Settings of ``explain``: the Shapley values of the training examples for one new text's prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = ["ExplainConfig"]


@dataclass(frozen=True)
class ExplainConfig:
    """How a prediction of a finished run's surrogate is explained (keys ``explain.*``; the keywords of
    :func:`freeshap_ray.explain` and the flags of ``freeshap-ray explain``).

    Each new text x is a one-point test set; the game's utility of a training subset S is read from the
    kernel regression's prediction F_S(x) (C,): ``prob`` = softmax(F_S(x))[label] (empty set: 1/C),
    ``margin`` = F_S(x)[label] - max_{c != label} F_S(x)[c] (empty set: 0). ``label``: the class explained
    (a name in ``data.label_names`` or a class index; "why not X?"); ``None``: the class the surrogate
    predicts for the text (trained on every example).

    ``sampler``, ``n_permutations``, ``truncation_tol``, ``truncation_patience``, ``seed``: as the
    ``shapley.*`` keys of the same names (permutation k is ``default_rng([seed, k]).permutation(n)``).
    ``permutations_per_task``: permutations per Ray task when Ray is up. ``num_actors``: kernel-row actors
    started when Ray is up and none are given. ``top``: examples shown per side (helpful / harmful).
    """

    utility: Literal["prob", "margin"] = "prob"
    label: int | str | None = None
    n_permutations: int = 200
    truncation_tol: float = 0.05
    truncation_patience: int = 2
    sampler: Literal["tmc", "permutation", "antithetic"] = "tmc"
    seed: int = 0
    top: int = 10
    permutations_per_task: int = 25
    num_actors: int = 1

    def __post_init__(self) -> None:
        if self.utility not in ("prob", "margin"):
            raise ConfigError(f"explain.utility: must be one of ['prob', 'margin'], got {self.utility!r}")
        if self.sampler not in ("tmc", "permutation", "antithetic"):
            raise ConfigError(f"explain.sampler: must be one of ['tmc', 'permutation', 'antithetic'], "
                              f"got {self.sampler!r}")
        if isinstance(self.label, bool) or (self.label is not None and not isinstance(self.label, (int, str))):
            raise ConfigError(f"explain.label: a class name or index (or null), got {self.label!r}")
        if isinstance(self.label, str) and not self.label.strip():
            raise ConfigError("explain.label: must not be empty (null explains the predicted class)")
        for key in ("n_permutations", "truncation_patience", "top", "permutations_per_task", "num_actors"):
            if getattr(self, key) < 1:
                raise ConfigError(f"explain.{key}: must be >= 1, got {getattr(self, key)}")
        if self.seed < 0:
            raise ConfigError(f"explain.seed: must be >= 0, got {self.seed}")
        if not self.truncation_tol >= 0:
            raise ConfigError(f"explain.truncation_tol: must be >= 0, got {self.truncation_tol}")

    def estimation_key(self) -> dict[str, object]:
        """What decides the values of an explanation (``top`` and the Ray task sizes do not)."""
        return {"utility": self.utility, "label": self.label, "n_permutations": self.n_permutations,
                "truncation_tol": float(self.truncation_tol), "truncation_patience": self.truncation_patience,
                "sampler": self.sampler, "seed": self.seed}
