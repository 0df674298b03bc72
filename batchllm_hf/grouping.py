"""Row grouping for SharedPrefixCache.from_inputs (TEMPORARY: replaced by cluster_prefixes)."""

from __future__ import annotations



def group_prompts(rows: list[list[int]], min_prefix_len: int = 1):
    """Returns (prefixes, group_of_row, prefix_len_of_row)."""
    by_first: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_first.setdefault(r[0], []).append(i)
    prefixes, group_of_row, cut = [], [0] * len(rows), [0] * len(rows)
    for members in by_first.values():
        n = min(len(rows[i]) for i in members) - 1
        first = rows[members[0]]
        lcp = n
        for i in members[1:]:
            k = 0
            while k < lcp and rows[i][k] == first[k]:
                k += 1
            lcp = k
        if len(members) < 2 or lcp < min_prefix_len:
            for i in members:
                group_of_row[i] = len(prefixes)
                prefixes.append([])
            continue
        for i in members:
            group_of_row[i] = len(prefixes)
            cut[i] = lcp
        prefixes.append(first[:lcp])
    return prefixes, group_of_row, cut
