"""Exception types. Every user-facing error names the offending field, file or value."""

from __future__ import annotations

__all__ = ["FreeShapError", "ConfigError", "DataError", "ModelError", "KernelError", "OutputError"]


class FreeShapError(ValueError):
    """Base class for errors caused by user input (config, data, model, existing outputs)."""


class ConfigError(FreeShapError):
    """A config key is unknown, has the wrong type, or an invalid value. Message starts with the dotted key."""


class DataError(FreeShapError):
    """A data file or dataset is missing, unreadable, empty, or has bad columns/labels."""


class ModelError(FreeShapError):
    """A model path, template, label word or parameter selection is invalid."""


class KernelError(FreeShapError):
    """A kernel is malformed: wrong shape, non-finite entries, not symmetric."""


class OutputError(FreeShapError):
    """An output directory or artifact is missing, incomplete, or would be overwritten."""
