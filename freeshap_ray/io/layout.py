"""Where each artifact lives under a run's output directory.

```
OUT/manifest.json                      config, versions, per-stage timings
OUT/train.parquet, OUT/test.parquet    index, id, text, label, label_name
OUT/duplicates.parquet                 (data.dedupe) the examples dropped as duplicates, with the row each repeats
OUT/kernel/plan.json                   signature of the plan the tiles belong to (resume check)
OUT/kernel/manifest.json               kind, shapes, blocks, tiles, parameter count, condition number
OUT/kernel/train_train/tile-rRRRRR-cCCCCC.parquet   lower-triangular train×train tiles
OUT/kernel/test_train/tile-rRRRRR-cCCCCC.parquet    test×train tiles
OUT/features/_plan.json, OUT/features/{train,test}-NNNNNNNN.parquet, OUT/features/_manifest.json
                                       (kernel.projection_dim > 0) projected features, one row per example
                                       (io/features.py; written by the workers, the manifest last)
OUT/shapley/run.json                   what the marginals are of (problem digest, utility, sampler, ...)
OUT/shapley/marginals/part-NNNNN.parquet            per-permutation marginal contributions (whole permutations)
OUT/values.parquet                     one row per training example
OUT/values_per_test.parquet            (per_test_point) one row per (training, test) pair
OUT/suspects.parquet                   `clean`: training points ranked by suspicion
OUT/clean/{scores,curves}.parquet, OUT/clean/noise/*, OUT/clean/summary.json   `clean` outputs
OUT/explanations.parquet               `explain`: one row per explained text and training example
OUT/explain/train_features/            `explain`: cached training gradient blocks (key.json, block-NNNNN.npz)
OUT/report.html                        `report`
```

``OUT`` may be an object-store or filesystem URI: the run then works in a local staging copy that is
mirrored to it (:mod:`freeshap_ray.io.remote`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .remote import local_root

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Paths of one run's artifacts."""

    root: Path

    @classmethod
    def of(cls, root: str | Path) -> Layout:
        """Layout of the run at ``root``: a directory path, or an output URI (``s3://``, ``gs://``,
        ``file://``, ...), whose local staging directory is used (see :mod:`freeshap_ray.io.remote`:
        opened and downloaded on first use, every committed file uploaded)."""
        return cls(local_root(root))

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def examples(self, split: str) -> Path:
        return self.root / f"{split}.parquet"

    @property
    def duplicates(self) -> Path:
        return self.root / "duplicates.parquet"

    @property
    def kernel_dir(self) -> Path:
        return self.root / "kernel"

    @property
    def kernel_plan(self) -> Path:
        """Written when a kernel computation starts: the plan signature that finished tiles belong to."""
        return self.kernel_dir / "plan.json"

    @property
    def kernel_manifest(self) -> Path:
        return self.kernel_dir / "manifest.json"

    def kernel_tile(self, matrix: str, name: str) -> Path:
        return self.kernel_dir / matrix / f"{name}.parquet"

    @property
    def shapley_dir(self) -> Path:
        return self.root / "shapley"

    @property
    def marginals_dir(self) -> Path:
        return self.root / "shapley" / "marginals"

    def marginals_part(self, index: int) -> Path:
        return self.marginals_dir / f"part-{index:05d}.parquet"

    @property
    def values(self) -> Path:
        return self.root / "values.parquet"

    @property
    def values_per_test(self) -> Path:
        return self.root / "values_per_test.parquet"

    # ---- cleaning and report (freeshap-ray clean / report)
    @property
    def suspects(self) -> Path:
        return self.root / "suspects.parquet"

    @property
    def clean_dir(self) -> Path:
        return self.root / "clean"

    @property
    def scores(self) -> Path:
        return self.clean_dir / "scores.parquet"

    @property
    def curves(self) -> Path:
        return self.clean_dir / "curves.parquet"

    @property
    def noise_dir(self) -> Path:
        return self.clean_dir / "noise"

    @property
    def noise_suspects(self) -> Path:
        return self.noise_dir / "suspects.parquet"

    @property
    def noise_scores(self) -> Path:
        return self.noise_dir / "scores.parquet"

    @property
    def detection(self) -> Path:
        return self.noise_dir / "detection.parquet"

    @property
    def summary(self) -> Path:
        return self.clean_dir / "summary.json"

    # ---- explanations of new texts (freeshap-ray explain)
    @property
    def explanations(self) -> Path:
        return self.root / "explanations.parquet"

    @property
    def explain_dir(self) -> Path:
        return self.root / "explain"

    @property
    def train_features(self) -> Path:
        """Cache of the training set's gradient blocks (derived from the kernel's plan; safe to delete)."""
        return self.explain_dir / "train_features"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def outputs(self) -> list[Path]:
        """Every path ``clean`` writes (the summary last)."""
        return [self.suspects, self.scores, self.curves, self.noise_suspects, self.noise_scores, self.detection,
                self.summary]
