"""``OUT/manifest.json``: the resolved config, package versions and one typed entry per finished stage.

Each stage writes its entry once, when it has finished (:meth:`RunManifest.record`); the file is rewritten
atomically, keeping the other stages' entries.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic

__all__ = ["RunManifest", "StageEntry", "versions"]

log = logging.getLogger(__name__)

_PACKAGES = ("freeshap_ray", "torch", "transformers", "ray", "numpy", "scipy", "pyarrow", "datasets")


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass(frozen=True)
class StageEntry:
    """One finished stage: when it finished and its statistics (sizes, timings, stop reason, ...)."""

    finished_at: str
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def now(cls, stats: dict[str, Any]) -> StageEntry:
        return cls(time.strftime("%Y-%m-%dT%H:%M:%S%z"), dict(stats))

    def to_dict(self) -> dict[str, Any]:
        return {"finished_at": self.finished_at, **self.stats}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageEntry:
        rest = {k: v for k, v in data.items() if k != "finished_at"}
        return cls(str(data.get("finished_at", "")), rest)


@dataclass
class RunManifest:
    """The manifest of one run directory.

    Attributes:
        path: ``OUT/manifest.json``.
        config: the resolved job config (plain dict) of the last stage that ran.
        versions: package versions of the last stage that ran.
        stages: stage name → :class:`StageEntry`.
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    stages: dict[str, StageEntry] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> RunManifest:
        """The manifest at ``path``; an unreadable one is rebuilt (a summary, not a result), with a warning."""
        data: Any = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                log.warning("output: %s is unreadable (%s); writing a fresh run manifest", path, err)
        if not isinstance(data, dict):
            data = {}
        stages = {k: StageEntry.from_dict(v) for k, v in data.get("stages", {}).items() if isinstance(v, dict)}
        return cls(path, data.get("config", {}), data.get("versions", {}), stages)

    def record(self, stage: str, config: dict[str, Any], stats: dict[str, Any]) -> StageEntry:
        """Add (or replace) ``stage``'s entry and write the manifest."""
        entry = StageEntry.now(stats)
        self.config, self.versions = config, versions()
        self.stages[stage] = entry
        write_json_atomic({"config": self.config, "versions": self.versions,
                           "stages": {k: v.to_dict() for k, v in self.stages.items()}}, self.path)
        return entry
