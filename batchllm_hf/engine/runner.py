"""Turns a scheduled step (list of Chunks) into packed tensors and runs the HF model's own forward on them.

Packed layout of one step (batch dimension 1): the chunks' tokens back to back, explicit position ids
(each token's position in its full prompt), flat KV slots, and the paged attention metadata of
kernels/paged.py. Logits are computed only at the last token of chunks that sample (`logits_to_keep`).
"""

from __future__ import annotations

import inspect

import torch

from ..cache import cache_argument_name
from ..kernels.paged import PagedAttentionMetadata
from .kv_pool import PagedCache, Step, plan_paged_attention
from .paged_sdpa import StepShape
from .scheduler import Chunk, Group


def build_step(chunks: list[Chunk], page_size: int, device: torch.device, shared_prefix: bool):
    """Returns (input_ids (1, T), position_ids (1, T), Step, sample_index (N,))."""
    token_ids, positions, slots, sample_index = [], [], [], []
    q_starts, own_lens, own_tables, seq_group, shape_prefix = [0], [], [], [], []
    group_slot: dict[int, int] = {}
    prefix_tables, prefix_lens = [], []
    for chunk in chunks:
        seq, lo, hi = chunk.seq, chunk.start, chunk.start + chunk.length
        if isinstance(seq, Group):
            tokens, offset, pages, table, group = seq.prefix[lo:hi], 0, seq.pages, seq.pages, -1
            position_base = 0
        else:
            prefix = seq.group.prefix
            position_base = len(prefix)
            tokens, pages = seq.own_tokens[lo:hi], seq.pages
            if prefix and shared_prefix:
                group = group_slot.setdefault(id(seq.group), len(group_slot))
                if group == len(prefix_tables):
                    prefix_tables.append(seq.group.pages)
                    prefix_lens.append(len(prefix))
                offset, table = 0, pages
            else:
                # prefix page-aligned: the member reads prefix pages + own pages as one sequence
                group, offset, table = -1, len(prefix), seq.group.pages + pages
        token_ids += tokens
        for p in range(lo, hi):
            positions.append(position_base + p)
            slots.append(pages[p // page_size] * page_size + p % page_size)
        own_lens.append(offset + hi)
        own_tables.append(table)
        seq_group.append(group)
        shape_prefix.append(prefix_lens[group] if group >= 0 else 0)
        q_starts.append(q_starts[-1] + len(tokens))
        if chunk.sample:
            sample_index.append(q_starts[-1] - 1)

    def table_tensor(tables):
        width = max(1, max((len(t) for t in tables), default=1))
        rows = [t + [0] * (width - len(t)) for t in tables] or [[0]]
        return torch.tensor(rows, dtype=torch.int32, device=device)

    def int32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    meta = PagedAttentionMetadata(
        q_starts=int32(q_starts), own_lens=int32(own_lens), own_pages=table_tensor(own_tables),
        seq_group=int32(seq_group), prefix_pages=table_tensor(prefix_tables),
        prefix_lens=int32(prefix_lens or [0]), page_size=page_size,
    )
    shape = StepShape(tuple(b - a for a, b in zip(q_starts, q_starts[1:])), tuple(own_lens), tuple(shape_prefix))
    step = Step(torch.tensor(slots, dtype=torch.int64, device=device), meta, shape)
    input_ids = torch.tensor([token_ids], dtype=torch.long, device=device)
    position_ids = torch.tensor([positions], dtype=torch.long, device=device)
    return input_ids, position_ids, step, torch.tensor(sample_index, dtype=torch.long, device=device)


class ModelRunner:
    def __init__(self, model, cache: PagedCache, shared_prefix: bool):
        self.model = model
        self.cache = cache
        self.shared_prefix = shared_prefix
        self.cache_kwarg = cache_argument_name(model)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.decode_graphs = None  # a DecodeGraphs (decode_graphs.py), set by the engine on CUDA

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        """The HF forward on packed tokens (the cache's step already set): logits (N, V) at sample_index."""
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = sample_index
        logits = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits[0]
        return logits if self.keeps_logits else logits[sample_index]

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """One step over the packed tokens; returns fp32 logits (N, V) at the sampled positions."""
        input_ids, position_ids, step, sample_index = build_step(chunks, self.cache.page_size, self.model.device,
                                                                  self.shared_prefix)
        graphs = self.decode_graphs
        if graphs is not None and all(c.length == 1 and c.sample for c in chunks) and graphs.fits(len(chunks), step):
            logits = graphs.run(input_ids, position_ids, step)
            if logits is not None:
                return logits.float()
        if self.cache.backend == "triton":
            step.plan = plan_paged_attention(step.meta, *self.cache.num_heads)
        self.cache.step = step
        try:
            return self.forward(input_ids, position_ids, sample_index).float()
        finally:
            self.cache.step = None
