"""Row grouping for SharedPrefixCache.from_inputs, on top of the global clustering."""

from __future__ import annotations

from .clustering import cluster_prefixes


def group_prompts(rows: list[list[int]], min_prefix_len: int = 1):
    """Returns (prefixes, group_of_row, prefix_len_of_row): each group's prefix token ids, each row's group
    index and the length of its group's prefix (0 for a group of one)."""
    plan = cluster_prefixes(rows, min_prefix_len=min_prefix_len, min_group_size=2, align=1)
    prefixes = [[int(t) for t in group.prefix] for group in plan.groups]
    group_of_row = [int(g) for g in plan.group_of()]
    return prefixes, group_of_row, [len(prefixes[g]) for g in group_of_row]
