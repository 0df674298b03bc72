"""Decode steps replayed as CUDA graphs, so a small model's step is not bound by Python launch overhead.

A decode-only step (one query token per sequence) with n sequences runs on static buffers of the next
captured size b >= n (1, 2, 4, ..., max_size). Rows n..b-1 are padding: token 0 at position 0, writing
its KV to a scratch page no sequence owns, attending only to itself, logits discarded. Before each replay
the step's tensors are copied into the buffers and the Triton attention's static work plan is refilled
from the step's host arrays (`plan_attention(..., buffers=...)`: no host sync, one non-blocking copy).
Graphs need the Triton backend (the SDPA fallback sizes its tensors from host values); `capture=False`
runs the same static-buffer path eagerly, which is how the padding logic is tested on CPU.

Safety net: the first replay of each size is checked against an eager forward on the same buffers; a
mismatch, or any error while capturing, turns graphs off for this engine (with a warning) and the step
runs eagerly.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from ..kernels.attention_plan import plan_attention, tile_config
from ..kernels.paged import PagedAttentionMetadata
from .kv_pool import PagedCache, Step
from .paged_sdpa import StepShape

from ..kernels import allocate_plan


class DecodeGraphs:
    def __init__(self, model, cache: PagedCache, forward, max_size: int, table_width: int, capture: bool):
        self.model, self.cache, self.forward = model, cache, forward
        self.sizes = [1 << i for i in range(max_size.bit_length()) if 1 << i < max_size] + [max_size]
        self.table_width = table_width
        self.capture = capture
        self.enabled = True
        self.error: str | None = None  # why graphs were turned off, if they were
        self.plan_misses = 0  # decode steps that ran eagerly because they did not fit the static plan
        self.setup_seconds = 0.0  # host time spent capturing graphs and checking their first replays
        self.graphs: dict[int, tuple] = {}
        self.checked: set[int] = set()
        b, device, i32 = max_size, model.device, torch.int32
        self.input_ids = torch.zeros((1, b), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((1, b), dtype=torch.long, device=device)
        self.slots = torch.zeros(b, dtype=torch.long, device=device)
        self.sample_index = torch.arange(b, device=device)
        self.q_starts = torch.arange(b + 1, dtype=i32, device=device)
        self.own_lens = torch.ones(b, dtype=i32, device=device)
        self.own_pages = torch.zeros((b, table_width), dtype=i32, device=device)
        self.seq_group = torch.full((b,), -1, dtype=i32, device=device)
        self.prefix_pages = torch.zeros((b, table_width), dtype=i32, device=device)
        self.prefix_lens = torch.zeros(b, dtype=i32, device=device)
        self.plan = None
        if cache.backend == "triton":
            num_q_heads, _, head_dim = cache.num_heads
            num_kv_heads = cache.num_heads[1]
            # Unsplit, a decode step has at most 2 items (own + prefix tile) per sequence and KV head; the
            # headroom takes KV splits (the plan coarsens them until the step fits).
            # Tiles of the planner's decode choice for 64-row groups (64 keys, 4 warps, 2 stages at head_dim
            # <= 128; 32 keys, 3 stages above, which fit shared memory: tests/kernels/test_compile_sm90.py).
            block_m, block_m_own, block_n, num_warps, num_stages = tile_config(64, 16, head_dim, 64)
            self.plan = allocate_plan(b, 2 * num_kv_heads * b + 4096, 16 * b + 4096, num_q_heads, head_dim, device,
                                      block_m=block_m, block_m_own=block_m_own, block_n=block_n,
                                      num_warps=num_warps, num_stages=num_stages)
        self._reset_padding(0, b)

    def _reset_padding(self, lo: int, hi: int) -> None:
        scratch = self.cache.scratch_page
        self.input_ids[0, lo:hi] = 0
        self.position_ids[0, lo:hi] = 0
        self.slots[lo:hi] = scratch * self.cache.page_size
        self.own_lens[lo:hi] = 1
        self.own_pages[lo:hi, 0] = scratch
        self.seq_group[lo:hi] = -1

    def _step(self, b: int, shape: StepShape | None) -> Step:
        meta = PagedAttentionMetadata(self.q_starts[:b + 1], self.own_lens[:b], self.own_pages[:b], self.seq_group[:b],
                                      self.prefix_pages, self.prefix_lens, self.cache.page_size)
        return Step(self.slots[:b], meta, shape, self.plan)

    def _run_static(self, b: int, step: Step) -> torch.Tensor:
        self.cache.step = step
        try:
            return self.forward(self.input_ids[:, :b], self.position_ids[:, :b], self.sample_index[:b])
        finally:
            self.cache.step = None

    def fits(self, num_seqs: int, step: Step) -> bool:
        return (self.enabled and num_seqs <= self.sizes[-1] and step.meta.own_pages.shape[1] <= self.table_width
                and step.meta.prefix_pages.shape[1] <= self.table_width
                and step.meta.prefix_pages.shape[0] <= self.sizes[-1])

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: Step, host) -> torch.Tensor | None:
        """Logits (n, V) of a decode-only step, or None when this step must run eagerly. `host`: the step's
        host arrays (runner.HostStep), from which the static attention plan is refilled without a sync."""
        n = input_ids.shape[1]
        b = next(s for s in self.sizes if s >= n)
        meta = step.meta
        self.input_ids[:, :n] = input_ids
        self.position_ids[:, :n] = position_ids
        self.slots[:n] = step.slots
        self.own_lens[:n] = meta.own_lens
        self.own_pages[:n, :meta.own_pages.shape[1]] = meta.own_pages
        self.seq_group[:n] = meta.seq_group
        groups, width = meta.prefix_pages.shape
        self.prefix_pages[:groups, :width] = meta.prefix_pages
        self.prefix_lens[:groups] = meta.prefix_lens
        self._reset_padding(n, b)
        pad = b - n
        shape = None
        if step.shape is not None:
            shape = StepShape(step.shape.q_lens + (1,) * pad, step.shape.own_lens + (1,) * pad,
                              step.shape.prefix_lens + (0,) * pad)
        static = self._step(b, shape)
        if self.plan is not None:
            try:
                plan_attention(np.arange(b + 1), np.concatenate([host.own_lens, np.ones(pad, dtype=np.int64)]),
                               np.concatenate([host.seq_group, np.full(pad, -1, dtype=np.int64)]), host.prefix_lens,
                               *self.cache.num_heads, self.model.device, buffers=self.plan)
            except ValueError as error:  # the step does not fit the static plan: this one runs eagerly
                if not self.plan_misses:
                    warnings.warn(f"a decode step of {n} sequences did not fit the CUDA graphs' static attention "
                                  f"plan ({error}); such steps run eagerly.")
                self.plan_misses += 1
                return None
        if not self.capture:
            return self._run_static(b, static)[:n]
        try:
            start = time.perf_counter()
            if b not in self.graphs:
                self._capture(b, static)
            graph, logits = self.graphs[b]
            graph.replay()
            out = logits[:n]
            if b not in self.checked:
                eager = self._run_static(b, static)[:n]
                tolerance = 1e-2 * float(eager.abs().max()) + 1e-3
                if not torch.allclose(out.float(), eager.float(), atol=tolerance, rtol=0):
                    raise RuntimeError(f"graph replay of batch size {b} differs from eager")
                self.checked.add(b)
                self.setup_seconds += time.perf_counter() - start
            return out
        except Exception as error:  # any capture/replay problem: keep the engine correct, drop the speed-up
            self.error = f"{type(error).__name__}: {error}"
            warnings.warn(f"CUDA graphs turned off for this engine ({self.error}); decode steps run eagerly.")
            self.enabled = False
            self.graphs.clear()
            return None

    def _capture(self, b: int, static: Step) -> None:
        self._run_static(b, static)  # warm-up: lazy initializations happen outside the capture
        torch.cuda.synchronize()
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
        graph = torch.cuda.CUDAGraph()
        self.cache.step = static
        try:
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(self.input_ids[:, :b], self.position_ids[:, :b], self.sample_index[:b])
        finally:
            self.cache.step = None
        self.graphs[b] = (graph, logits)
