"""A finished run as ``explain`` reads it: the resolved config (``OUT/manifest.json``), the examples and the
kernel, checked against each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..config import JobConfig, config_from_dict
from ..errors import FreeShapError, OutputError
from .layout import Layout
from .manifest import RunManifest
from .stores import Kernel, KernelStore, read_examples

__all__ = ["FinishedRun", "read_finished_run"]


@dataclass(frozen=True, eq=False)
class FinishedRun:
    """A run whose kernel stage has finished.

    Attributes:
        layout: its paths.
        config: the resolved job config recorded in ``manifest.json``.
        train, test: ``train.parquet`` / ``test.parquet`` (index, id, text, label, label_name).
        kernel: the assembled kernel (every tile checked).
    """

    layout: Layout
    config: JobConfig
    train: pa.Table
    test: pa.Table
    kernel: Kernel


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
    kernel = KernelStore(layout).read()
    train, test = read_examples(layout, "train"), read_examples(layout, "test")
    if (train.num_rows, test.num_rows) != (kernel.train_train.shape[0], kernel.test_train.shape[0]):
        raise OutputError(f"{layout.examples('train')}: {train.num_rows} training / {test.num_rows} test examples, "
                          f"but the kernel in {layout.kernel_dir} is of {kernel.train_train.shape[0]} / "
                          f"{kernel.test_train.shape[0]}; recompute the kernel (--overwrite)")
    return FinishedRun(layout, cfg, train, test, kernel)
