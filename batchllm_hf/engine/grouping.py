"""Requests -> scheduler Groups: shared prefixes from clustering, or a prompt shared by its n samples."""

from __future__ import annotations

import numpy as np

from ..clustering import cluster_prefixes
from .config import EngineConfig
from .scheduler import Group, Sequence


def _prefix_groups(prompts: list[list[int]], min_prefix_len: int, align: int,
                   flat=None) -> list[tuple[list[int], list[int]]]:
    """[(prefix, member indices)] covering every prompt once (empty prefix = group of one)."""
    plan = cluster_prefixes(prompts, min_prefix_len=min_prefix_len, min_group_size=2, align=align, flat=flat)
    return [([int(t) for t in g.prefix], [int(i) for i in g.members]) for g in plan.groups]


def _usable_prefix(prefix: list[int], prompts: list[list[int]], align: int) -> int:
    """Longest length <= len(prefix), a multiple of `align`, that every member shares and that leaves each
    member at least one own token (its last prompt token yields the first logits)."""
    length = min([len(prefix)] + [len(p) - 1 for p in prompts])
    shared = list(prefix[:length])
    for prompt in prompts:  # list comparison first: the clustering's prefix is normally shared whole
        head = prompt[:length]
        if (head if isinstance(head, list) else list(head)) != shared:
            length = int(np.flatnonzero(np.asarray(head) != np.asarray(shared))[0])
            shared = shared[:length]
    return max(0, length - length % align)


def build_groups(sequences: list[Sequence], num_samples: int, config: EngineConfig, flat=None) -> list[Group]:
    """`sequences` hold num_samples consecutive samples per prompt. A shared prefix keeps its full length:
    its last page may be partial, since a member's own tokens start on pages of their own and the attention
    reads the prefix up to its length (until session 10 prefixes were cut to whole pages, and each member
    prefilled the cut tokens again: 16 per member on W-paper's 2000-token prefixes at pages of 64). With
    use_shared_prefix off every prefix is cut to whole pages, since a member then reads its group's prefix
    pages as the first pages of its own page table. `flat`: the prompts' (tokens, lengths) from
    clustering.flatten_prompts, if the caller has them."""
    page = config.page_size
    align = 1 if config.use_shared_prefix else page
    by_prompt = [sequences[i:i + num_samples] for i in range(0, len(sequences), num_samples)]
    if num_samples > 1:
        # n samples of one prompt share the whole prompt but its last token
        groups = []
        for samples in by_prompt:
            prompt = samples[0].prompt
            length = len(prompt) - 1 if config.use_shared_prefix else (len(prompt) - 1) // page * page
            groups.append(Group(prompt[:length], samples))
        return groups
    if not config.cluster:
        return [Group([], samples) for samples in by_prompt]
    prompts = [samples[0].prompt for samples in by_prompt]
    min_prefix_len = config.min_prefix_len or page
    groups = []
    for prefix, members in _prefix_groups(prompts, min_prefix_len, align, flat):
        length = _usable_prefix(prefix, [prompts[i] for i in members], align) if len(members) > 1 else 0
        if length < min_prefix_len:
            groups += [Group([], by_prompt[i]) for i in members]
        else:
            groups.append(Group(prefix[:length], [s for i in members for s in by_prompt[i]]))
    return groups
