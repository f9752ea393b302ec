"""Partition selected parameters into shards: a kernel over a parameter set is the sum of shard kernels."""

from __future__ import annotations

__all__ = ["partition_params"]


def partition_params(names: list[str], sizes: list[int], n_shards: int) -> list[list[str]]:
    """Split ``names`` (model order) into ``n_shards`` contiguous groups of roughly equal total size.

    Contiguity keeps whole layers together, so an actor that owns late layers back-propagates only
    through the top of the network.

    Args:
        names: selected parameter names in ``named_parameters`` order.
        sizes: number of scalars of each.
        n_shards: number of groups (at most ``len(names)``).

    Returns:
        ``n_shards`` non-empty lists whose concatenation is ``names``.
    """
    if not 1 <= n_shards <= len(names):
        raise ValueError(f"kernel.param_shards: {n_shards} shards for {len(names)} parameter tensors")
    total = float(sum(sizes))
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    acc = 0.0
    for i, (name, size) in enumerate(zip(names, sizes)):
        remaining_names = len(names) - i
        # shard index by cumulative mass, but leave at least one tensor for each later shard
        s = min(int(acc / total * n_shards), n_shards - 1)
        s = max(s, n_shards - remaining_names)
        while s > 0 and not shards[s - 1]:
            s -= 1
        shards[s].append(name)
        acc += size
    return shards
