"""Job configuration: frozen dataclasses loaded from YAML with ``--set a.b=value`` overrides.

:mod:`.job` holds the FreeShap job's sections, :mod:`.reagent` the ReAGent job's, :mod:`.checks` the checks
they share and :mod:`.loader` the YAML loader and typed converter. Every error is a
:class:`~freeshap_ray.errors.ConfigError` whose message starts with the dotted key (``data.label_names: ...``),
so a user can find the line to fix.
"""

from __future__ import annotations

from .explain import ExplainConfig
from .job import CleanConfig, DataConfig, JobConfig, KernelConfig, ModelConfig, RayConfig, ShapleyConfig
from .loader import (
    QUICKSTART_CONFIG,
    apply_overrides,
    build_section,
    config_from_dict,
    config_to_dict,
    load_config,
    load_reagent_config,
    read_yaml,
    reagent_config_from_dict,
)
from .reagent import (
    ReagentConfig,
    ReagentEvalConfig,
    ReagentFanoutConfig,
    ReagentJobConfig,
    ReagentModelConfig,
    ReagentPromptsConfig,
)

__all__ = [
    "DataConfig",
    "ModelConfig",
    "KernelConfig",
    "ShapleyConfig",
    "RayConfig",
    "CleanConfig",
    "ExplainConfig",
    "JobConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "build_section",
    "read_yaml",
    "QUICKSTART_CONFIG",
    "ReagentConfig",
    "ReagentPromptsConfig",
    "ReagentModelConfig",
    "ReagentEvalConfig",
    "ReagentFanoutConfig",
    "ReagentJobConfig",
    "load_reagent_config",
    "reagent_config_from_dict",
]
