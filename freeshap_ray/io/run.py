"""A finished run as ``explain`` reads it: the resolved config (``OUT/manifest.json``), the examples and the
kernel (exact runs) or the projected features (``kernel.projection_dim > 0``: nothing n×n is formed), checked
against each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import JobConfig, config_from_dict
from ..errors import FreeShapError, OutputError
from .layout import Layout
from .manifest import RunManifest
from .stores import Kernel, KernelStore, read_examples, rows_per_example

__all__ = ["FinishedRun", "read_finished_run"]


@dataclass(frozen=True, eq=False)
class FinishedRun:
    """A run whose kernel stage has finished.

    Attributes:
        layout: its paths.
        config: the resolved job config recorded in ``manifest.json``.
        train, test: ``train.parquet`` / ``test.parquet`` (index, id, text, label, label_name).
        kernel: the assembled kernel (every tile checked); None for a projected run.
        kernel_info: the kernel stage's manifest (``kernel/manifest.json``).
        features: a projected run's stored ``(Φ_train (n·g, D), Φ_test (m·g, D))`` float32 features; None for an
            exact run.
    """

    layout: Layout
    config: JobConfig
    train: pa.Table
    test: pa.Table
    kernel: Kernel | None
    kernel_info: dict[str, Any]
    features: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def projected(self) -> bool:
        """Whether the run stored projected features instead of kernel tiles."""
        return self.features is not None


def read_finished_run(out_dir: str | Path) -> FinishedRun:
    """The run under ``out_dir``: its config, examples and kernel (errors name the file that is wrong)."""
    layout = Layout.of(out_dir)
    if not layout.root.is_dir():
        raise OutputError(f"{layout.root}: not a directory (give the `output` directory of a finished run)")
    if not layout.manifest.is_file():
        raise OutputError(f"{layout.manifest}: missing; run `freeshap-ray run CONFIG` first")
    manifest = RunManifest.read(layout.manifest)
    if not manifest.config:
        raise OutputError(f"{layout.manifest}: no job config recorded (unreadable, or not a run's manifest)")
    try:
        cfg = config_from_dict(manifest.config)
    except FreeShapError as err:
        raise OutputError(f"{layout.manifest}: the recorded job config is invalid ({err})") from err
    store = KernelStore(layout)
    info = store.manifest()
    train, test = read_examples(layout, "train"), read_examples(layout, "test")
    kernel, features = None, None
    if info.get("representation") == "features":
        from .features import FeatureStore

        fs = FeatureStore.of(layout.root)
        features = (fs.read_matrix("train")[0], fs.read_matrix("test")[0])
        g = rows_per_example(info)
        have, where = (features[0].shape[0] // g, features[1].shape[0] // g), fs.root
    else:
        kernel = store.assemble(info)
        have, where = (kernel.train_train.shape[0], kernel.test_train.shape[0]), layout.kernel_dir
    if (train.num_rows, test.num_rows) != have:
        raise OutputError(f"{layout.examples('train')}: {train.num_rows} training / {test.num_rows} test examples, "
                          f"but the kernel in {where} is of {have[0]} / {have[1]}; recompute the kernel (--overwrite)")
    return FinishedRun(layout, cfg, train, test, kernel, info, features)
