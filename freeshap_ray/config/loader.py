"""YAML job configs → validated dataclasses: the strict loader, ``--set a.b=value`` overrides and the typed
converter (every error is a :class:`~freeshap_ray.errors.ConfigError` naming the dotted key)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ..errors import ConfigError
from .job import JobConfig
from .reagent import ReagentJobConfig

__all__ = ["QUICKSTART_CONFIG", "apply_overrides", "build_section", "config_from_dict", "config_to_dict", "load_config",
           "load_reagent_config", "read_yaml", "reagent_config_from_dict"]

QUICKSTART_CONFIG = "quickstart.yaml"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to annotation ``tp``; raise ConfigError naming ``key`` on mismatch."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
        return build_section(tp, value, key + ".")
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
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
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
    return build_section(JobConfig, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists instead of tuples) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
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


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys (else the last one silently wins) and
    anchors/aliases (a job config never needs them, and nested aliases expand exponentially)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML API
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not supported in job configs; write the value out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML API
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once per section)",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML config file (UTF-8); ``None`` reads the embedded quickstart config.

    Duplicate keys and YAML aliases are errors; so are files that are not UTF-8 or not a mapping.
    """
    if path is None:
        text = (Path(__file__).parents[1] / "configs" / QUICKSTART_CONFIG).read_text(encoding="utf-8")
        origin = f"<embedded {QUICKSTART_CONFIG}>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r}: not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {str(p)!r}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                              "save the config as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"config file {str(p)!r}: cannot be read ({err.strerror or err})") from None
        origin = str(p)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
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


def reagent_config_from_dict(data: dict[str, Any]) -> ReagentJobConfig:
    """Build a validated :class:`ReagentJobConfig` from a nested mapping (as parsed from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return build_section(ReagentJobConfig, data)


def load_reagent_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ReagentJobConfig:
    """Load and validate a ReAGent job config from YAML plus ``--set`` overrides."""
    return reagent_config_from_dict(apply_overrides(read_yaml(path), overrides))
