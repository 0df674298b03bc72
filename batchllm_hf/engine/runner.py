"""Turns a scheduled step (list of Chunks) into packed tensors and runs the HF model's own forward on them.

Packed layout of one step (batch dimension 1): the chunks' tokens back to back, explicit position ids
(each token's position in its full prompt), flat KV slots, and the paged attention metadata of
kernels/paged.py. Logits are computed only at the last token of chunks that sample (`logits_to_keep`).
A step is packed on the host as numpy arrays (`HostStep`), which also feed the attention's work plan,
then uploaded in two non-blocking copies; a token the previous step sampled and the host has not read
yet (PENDING) is gathered on the device from that step's sampled tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..cache import cache_argument_name
from ..kernels.paged import PagedAttentionMetadata
from ..kernels.attention_plan import plan_attention
from .kv_pool import PagedCache, Step
from .paged_sdpa import StepShape
from .scheduler import PENDING, Chunk, Group
from .transfer import upload


@dataclass
class HostStep:
    """One step's packed inputs and paged metadata as host arrays (see the module docstring)."""

    token_ids: np.ndarray      # (T,) int64; PENDING where the token is still on the device
    positions: np.ndarray      # (T,) int64
    slots: np.ndarray          # (T,) int64
    sample_index: np.ndarray   # (N,) int64
    q_starts: np.ndarray       # (S + 1,) int64
    own_lens: np.ndarray       # (S,) int64
    seq_group: np.ndarray      # (S,) int64
    own_pages: np.ndarray      # (S, W) int32
    prefix_pages: np.ndarray   # (G, W') int32
    prefix_lens: np.ndarray    # (G,) int64
    pending_at: np.ndarray     # (P,) int64: packed positions whose token the previous step sampled
    pending_from: np.ndarray   # (P,) int64: ... at this index of that step's sampled tokens
    shape: StepShape


def _table(tables: list[list[int]]) -> np.ndarray:
    width = max(1, max((len(t) for t in tables), default=1))
    out = np.zeros((max(1, len(tables)), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return out


def build_host_step(chunks: list[Chunk], page_size: int, shared_prefix: bool) -> HostStep:
    """Packs a scheduled step on the host. Decode chunks (one token) take a scalar path, prefill chunks
    numpy ranges, so neither a long chunk nor many short ones cost a Python loop per token."""
    token_ids: list[int] = []
    pieces_pos, pieces_slot, run_pos, run_slot = [], [], [], []
    sample_index, pending_at, pending_from = [], [], []
    q_starts, own_lens, own_tables, seq_group, shape_prefix = [0], [], [], [], []
    group_slot: dict[int, int] = {}
    prefix_tables, prefix_lens = [], []
    for chunk in chunks:
        seq, lo, hi = chunk.seq, chunk.start, chunk.start + chunk.length
        if isinstance(seq, Group):
            tokens, pages, table, group, offset, base = seq.prefix[lo:hi], seq.pages, seq.pages, -1, 0, 0
        else:
            prefix = seq.group.prefix
            base = len(prefix)
            tokens, pages = seq.own_slice(lo, hi), seq.pages
            if prefix and shared_prefix:
                group = group_slot.setdefault(id(seq.group), len(group_slot))
                if group == len(prefix_tables):
                    prefix_tables.append(seq.group.pages)
                    prefix_lens.append(len(prefix))
                offset, table = 0, pages
            else:
                # prefix page-aligned: the member reads prefix pages + own pages as one sequence
                group, offset, table = -1, len(prefix), seq.group.pages + pages
            if tokens and tokens[-1] == PENDING:  # only a sequence's newest token can still be pending
                pending_at.append(q_starts[-1] + len(tokens) - 1)
                pending_from.append(seq.pending_index)
        token_ids += tokens
        if hi - lo == 1:
            run_pos.append(base + lo)
            run_slot.append(pages[lo // page_size] * page_size + lo % page_size)
        else:
            if run_pos:
                pieces_pos.append(np.array(run_pos, dtype=np.int64))
                pieces_slot.append(np.array(run_slot, dtype=np.int64))
                run_pos, run_slot = [], []
            p = np.arange(lo, hi, dtype=np.int64)
            pieces_pos.append(p + base)
            pieces_slot.append(np.asarray(pages, dtype=np.int64)[p // page_size] * page_size + p % page_size)
        own_lens.append(offset + hi)
        own_tables.append(table)
        seq_group.append(group)
        shape_prefix.append(prefix_lens[group] if group >= 0 else 0)
        q_starts.append(q_starts[-1] + len(tokens))
        if chunk.sample:
            sample_index.append(q_starts[-1] - 1)
    if run_pos:
        pieces_pos.append(np.array(run_pos, dtype=np.int64))
        pieces_slot.append(np.array(run_slot, dtype=np.int64))

    def i64(values):
        return np.array(values, dtype=np.int64)

    q_starts_a = i64(q_starts)
    return HostStep(
        token_ids=i64(token_ids), positions=np.concatenate(pieces_pos), slots=np.concatenate(pieces_slot),
        sample_index=i64(sample_index), q_starts=q_starts_a, own_lens=i64(own_lens), seq_group=i64(seq_group),
        own_pages=_table(own_tables), prefix_pages=_table(prefix_tables), prefix_lens=i64(prefix_lens or [0]),
        pending_at=i64(pending_at), pending_from=i64(pending_from),
        shape=StepShape(tuple(np.diff(q_starts_a).tolist()), tuple(own_lens), tuple(shape_prefix)),
    )


def to_device(host: HostStep, page_size: int, device: torch.device, previous_tokens: torch.Tensor | None):
    """Host step -> (input_ids (1, T), position_ids (1, T), Step, sample_index (N,)) on `device`, in two
    host-to-device copies from pinned memory that do not wait for the device. Pending tokens are gathered
    from `previous_tokens` (the last launched step's sampled tokens, still on the device)."""
    longs = [host.token_ids, host.positions, host.slots, host.sample_index, host.pending_at, host.pending_from]
    ints = [host.q_starts, host.own_lens, host.seq_group, host.prefix_lens, host.own_pages.ravel(),
            host.prefix_pages.ravel()]
    long_dev = upload(torch.from_numpy(np.concatenate(longs)), device)
    int_dev = upload(torch.from_numpy(np.concatenate(ints).astype(np.int32)), device)
    ids, positions, slots, sample_index, pending_at, pending_from = long_dev.split([a.shape[0] for a in longs])
    q_starts, own_lens, seq_group, prefix_lens, own_pages, prefix_pages = int_dev.split([a.shape[0] for a in ints])
    if host.pending_at.shape[0]:
        if previous_tokens is None:
            raise RuntimeError("a step reads pending tokens but no previous step's tokens were given")
        ids = ids.index_copy(0, pending_at, previous_tokens[pending_from])
    meta = PagedAttentionMetadata(
        q_starts=q_starts, own_lens=own_lens, own_pages=own_pages.view(host.own_pages.shape), seq_group=seq_group,
        prefix_pages=prefix_pages.view(host.prefix_pages.shape), prefix_lens=prefix_lens, page_size=page_size,
    )
    return ids[None], positions[None], Step(slots, meta, host.shape), sample_index


def _remaining(seq) -> int:
    """Tokens a decoding sequence is expected to still produce (its hint while below it, else its maximum)."""
    done = len(seq.output)
    return max(1, (seq.expected_new_tokens if done < seq.expected_new_tokens else seq.max_new_tokens) - done)


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (else it computes logits for every token)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class ModelRunner:
    def __init__(self, model, cache: PagedCache, shared_prefix: bool):
        self.model = model
        self.cache = cache
        self.shared_prefix = shared_prefix
        self.cache_kwarg = cache_argument_name(model)
        self.keeps_logits = keeps_logits(model)
        self.decode_graphs = None  # a DecodeGraphs (decode_graphs.py), set by the engine on CUDA

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        """The HF forward on packed tokens (the cache's step already set): logits (N, V) at sample_index."""
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = sample_index
        logits = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits[0]
        return logits if self.keeps_logits else logits[sample_index]

    @torch.inference_mode()
    def prepare_decode_graph(self, seqs: list) -> bool:
        """Capture ahead the CUDA graph of a coming decode step of `seqs` (in step order; DecodeGraphs.prepare)."""
        graphs = self.decode_graphs
        if graphs is None or not seqs:
            return False
        slots: dict[int, int] = {}  # groups numbered by first appearance, as build_host_step numbers them
        seq_group = np.fromiter((slots.setdefault(id(s.group), len(slots)) if s.group.prefix and self.shared_prefix
                                 else -1 for s in seqs), dtype=np.int64, count=len(seqs))
        remaining = np.fromiter((_remaining(s) for s in seqs), dtype=np.int64, count=len(seqs))
        return graphs.prepare(seq_group, remaining)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One step over the packed tokens; returns logits (N, V) in the model's dtype at the sampled positions
        (sampling widens them to fp32 where it computes on them), without waiting for the device.
        `previous_tokens`: the last launched step's sampled tokens (device), which this step reads where its
        tokens are still PENDING."""
        host = build_host_step(chunks, self.cache.page_size, self.shared_prefix)
        input_ids, position_ids, step, sample_index = to_device(host, self.cache.page_size, self.model.device,
                                                                previous_tokens)
        graphs = self.decode_graphs
        if graphs is not None and all(c.length == 1 and c.sample for c in chunks) and graphs.fits(len(chunks), step):
            # expected tokens still to come per sequence: whether this size is worth a capture
            remaining = None if graphs.admitted_size(len(chunks)) else np.fromiter(
                (_remaining(c.seq) for c in chunks), dtype=np.int64, count=len(chunks))
            logits = graphs.run(input_ids, position_ids, step, host, remaining)
            if logits is not None:
                return logits
        if self.cache.backend == "triton":
            step.plan = plan_attention(host.q_starts, host.own_lens, host.seq_group, host.prefix_lens,
                                       *self.cache.num_heads, self.model.device,
                                       use_tma=self.cache.attention_tma, pack=self.cache.attention_pack,
                                       page_size=self.cache.page_size)
        self.cache.step = step
        try:
            return self.forward(input_ids, position_ids, sample_index)
        finally:
            self.cache.step = None
