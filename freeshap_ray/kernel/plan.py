"""Split examples into blocks and kernel matrices into tiles."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tile", "blocks", "tiles"]


@dataclass(frozen=True)
class Tile:
    """One kernel tile: rows from block ``row`` of ``row_set``, columns from train block ``col``."""

    matrix: str  # "train_train" or "test_train"
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"tile-r{self.row:05d}-c{self.col:05d}"


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive blocks of at most ``size`` examples."""
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def tiles(n_train_blocks: int, n_test_blocks: int) -> list[Tile]:
    """Lower-triangular train×train tiles (row ≥ col; the rest is the transpose) and all test×train tiles."""
    out = [Tile("train_train", i, j) for i in range(n_train_blocks) for j in range(i + 1)]
    out += [Tile("test_train", i, j) for i in range(n_test_blocks) for j in range(n_train_blocks)]
    return out
