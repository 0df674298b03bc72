"""Decode steps replayed as CUDA graphs, so a small model's step is not bound by Python launch overhead.

A decode-only step (one query token per sequence) with n sequences runs on static buffers of the next
size b >= n: powers of two up to 256, then multiples of 64 up to max_size (so a step of 800 pads to 832,
not 1024: at that size the step is matmul-bound and padding costs its share of the matmuls). Rows n..b-1
are padding: token 0 at position 0, writing its KV to a scratch page no sequence owns, attending only to
itself, logits discarded. Before each replay
the step's tensors are copied into the buffers and the Triton attention's static work plan is refilled
from the step's host arrays (`plan_attention(..., buffers=...)`: no host sync, one non-blocking copy).
Graphs need the Triton backend (the SDPA fallback sizes its tensors from host values); `capture=False`
runs the same static-buffer path eagerly, which is how the padding logic is tested on CPU.

A size is captured only when the step says it will be used for at least `min_capture_steps` steps (the
runner passes each sequence's expected remaining tokens; a capture costs about three eager forwards of
host time, which a few replays do not pay back): the tail of a job, where the batch shrinks every step,
pads into a size already captured while that is at most `tail_padding` times the batch
(EngineConfig.graph_tail_padding, default 32), and runs eagerly below that, instead of capturing a graph per step.

A batch of more than 256 sequences whose size will not change for EXACT_SIZE_STEPS steps (no running
sequence expects to finish sooner) gets a graph of its own size, rounded up to a multiple of 16, instead of
the next multiple of 64: such a step is matmul-bound, so padding costs its share (W-paper's 800 sequences
ran at 832, about 4% more matmul work, and cuBLAS picks its kernels by size). One such size per 64-wide
bucket: a later batch in the same bucket pads into it or into the bucket's own size.

Captures ahead (`prepare`): once every request is admitted, the engine asks, after launching a prefill
step, for the graph of the decode batch to come (all running sequences). That capture runs while the
device still works through the queued prefill steps: no synchronize, the warm-up and a check replay on
padding inputs (they touch the scratch page only; `_check_step`). A capture at the first decode step instead makes
the device wait for it (session 9: 0.14 s of W-paper's 9.3 s, 0.08 s of W-8B's 3.0 s).

Safety net: the first replay of each size is checked against the eager warm-up forward that precedes
the capture (same buffers, same inputs; ahead of time: the padding inputs, the result read at the size's
first use); a mismatch, or any error while capturing, turns graphs off for this engine (with a warning)
and the step runs eagerly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings

import numpy as np
import torch

from ..kernels.attention_plan import plan_attention, static_decode_tiles, tile_config, tma_default, tma_loop_options
from ..kernels.paged import PagedAttentionMetadata
from .kv_pool import PagedCache, Step, step_activation_bytes
from .paged_sdpa import StepShape

from ..kernels import allocate_plan


MIN_CAPTURE_STEPS = 6
EXACT_SIZE_STEPS = 12  # a batch above 256 that stays the same this many steps gets a graph of its own size
_EXACT_MULTIPLE = 16
_POWER_SIZES_UP_TO = 256
_SIZE_STEP = 64


def graph_sizes(max_size: int) -> list[int]:
    """Batch sizes that get their own graph: 1, 2, 4, ..., 256, then 320, 384, ... up to max_size."""
    sizes = [1 << i for i in range(max_size.bit_length()) if 1 << i < min(max_size, _POWER_SIZES_UP_TO + 1)]
    sizes += list(range(_POWER_SIZES_UP_TO + _SIZE_STEP, max_size, _SIZE_STEP))
    return sorted(set(sizes) | {max_size})


class DecodeGraphs:
    def __init__(self, model, cache: PagedCache, forward, max_size: int, table_width: int, capture: bool,
                 min_capture_steps: int | None = None, tail_padding: float = 32.0):
        self.model, self.cache, self.forward = model, cache, forward
        self.sizes = graph_sizes(max_size)
        self.base_sizes = tuple(self.sizes)  # without the exact sizes added on the way (_exact_size)
        self.min_capture_steps = MIN_CAPTURE_STEPS if min_capture_steps is None else min_capture_steps
        self.tail_padding = tail_padding  # a tail step pads into a captured size at most this many times larger
        self.admitted: set[int] = set()  # sizes that run on the static path (captured when capture=True)
        self.skipped = 0  # decode steps that ran eagerly because their size would serve too few steps
        self.table_width = table_width
        self.capture = capture
        self.enabled = True
        self.error: str | None = None  # why graphs were turned off, if they were
        self.plan_misses = 0  # decode steps that ran eagerly because they did not fit the static plan
        self.setup_seconds = 0.0  # host time spent capturing graphs and checking their first replays
        self.ahead = 0  # sizes captured ahead of their first decode step (prepare)
        # size -> (graph, its logits, its first replay's check: the eager warm-up's logits, or for a size
        # captured ahead the check's (pinned flag, event), or None once checked)
        self.graphs: dict[int, tuple] = {}
        self.plans: dict = {}  # size -> its static plan (shared buffers, the size's own tiles)
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
            # Unsplit, a decode step has per sequence and KV head ceil(ratio / 16) own tiles (16-row tiles)
            # plus at most ceil(ratio / 64) prefix tiles (a group of one; larger groups share theirs): 2
            # items for GQA ratios up to 16. It has 2 partial results per sequence (prefix + own). The
            # headroom takes KV splits (the plan coarsens them until the step fits; large batches fill the
            # GPU unsplit). Partials cost Hq * head_dim * 4 bytes each: 4 * b + 4096 of them is 134 MB at
            # b = 1024 for Llama-3-8B (16 * b + 4096 was 335 MB).
            # Tiles of the planner's decode choice for 64-row groups (with TMA key loads, the default where
            # pages hold whole 64-key blocks on Hopper: 64 keys, 4 warps, 3 stages, page ids a block ahead, a
            # 1-stage masked loop; without: 64 keys, 4 warps, 2 stages at head_dim <= 128; 32 keys, 3 stages
            # above, which fit shared memory: tests/kernels/test_compile_sm90.py); each size replaces them
            # with its own on admission (_plan_for). The item capacity holds any prefix tile size >= 16 rows.
            tma = cache.attention_tma if cache.attention_tma is not None else tma_default(device, cache.page_size,
                                                                                          head_dim)
            block_m, block_m_own, block_n, num_warps, num_stages = tile_config(64, 16, head_dim, 64, tma=tma)
            ratio = num_q_heads // num_kv_heads
            tiles = -(-ratio // 16) + -(-ratio // 64)
            self.plan = allocate_plan(b, tiles * num_kv_heads * b + 4096, 4 * b + 4096, num_q_heads, head_dim, device,
                                      block_m=block_m, block_m_own=block_m_own, block_n=block_n,
                                      num_warps=num_warps, num_stages=num_stages, use_tma=tma,
                                      packed=cache.attention_pack,
                                      **tma_loop_options(tma, head_dim))
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
        return Step(self.slots[:b], meta, shape, self.plans.get(b, self.plan))

    def _plan_for(self, seq_group: np.ndarray):
        """The static plan of a size first admitted on this step (its sequences' groups): the shared buffers
        with the tiles the per-step planner would pick for it (attention_plan.static_decode_tiles)."""
        num_q_heads, num_kv_heads, head_dim = self.cache.num_heads
        block_m, block_m_own, block_n, num_warps, num_stages = static_decode_tiles(
            seq_group, num_q_heads // num_kv_heads, head_dim, tma=self.plan.use_tma)
        return dataclasses.replace(self.plan, block_m=block_m, block_m_own=block_m_own, block_n=block_n,
                                   num_warps=num_warps, num_stages=num_stages)

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

    def size_for(self, n: int) -> int | None:
        """The padded size a decode step of n sequences runs at (None: over the largest)."""
        return next((s for s in self.sizes if s >= n), None)

    def admitted_size(self, n: int) -> bool:
        """Whether a decode step of n sequences already has its size taken (no hint needed)."""
        return self.size_for(n) in self.admitted

    def expected_steps(self, n: int, remaining: np.ndarray) -> int:
        """Steps until fewer sequences than the next smaller size are left, if each of the n running sequences
        runs for its `remaining` (expected) tokens: how often a graph of this step's size would be replayed."""
        b = self.size_for(n)
        lower = max((s for s in self.sizes if s < b), default=0)
        return int(np.partition(remaining, n - 1 - lower)[n - 1 - lower])

    def _exact_size(self, n: int, b: int, remaining: np.ndarray) -> int:
        """n rounded up to a multiple of 16, added to the sizes, when a batch of n > 256 sequences stays n for
        EXACT_SIZE_STEPS steps and its 64-wide bucket has no size taken yet; else b."""
        exact = -(-n // _EXACT_MULTIPLE) * _EXACT_MULTIPLE
        lower = max((s for s in self.base_sizes if s < b), default=0)
        if (n <= _POWER_SIZES_UP_TO or exact >= b
                or int(remaining.min()) < max(EXACT_SIZE_STEPS, self.min_capture_steps)  # then it is admitted
                or any(lower < s <= b for s in self.admitted)):
            return b
        self.sizes = sorted(set(self.sizes) | {exact})
        return exact

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: Step, host,
            remaining: np.ndarray | None = None) -> torch.Tensor | None:
        """Logits (n, V) of a decode-only step, or None when this step must run eagerly. `host`: the step's
        host arrays (runner.HostStep), from which the static attention plan is refilled without a sync.
        `remaining`: each sequence's expected tokens still to come (None: always use the graphs)."""
        n = input_ids.shape[1]
        b = self.size_for(n)
        if b not in self.admitted and remaining is not None:
            b = self._exact_size(n, b, remaining)
        if b not in self.admitted:
            if remaining is not None and self.expected_steps(n, remaining) < self.min_capture_steps:
                # too few steps to pay for a capture of its own: pad into a larger size already taken, if
                # at most tail_padding (default 32) times as large (the shrinking tail of a large batch: an
                # eager step of hundreds of sequences is bound by the host's launches, W-paper's took 40-53
                # ms against 25-29 ms for its graph, session 7), else run eagerly
                larger = min((s for s in self.admitted if s > b), default=None)
                if larger is None or larger > self.tail_padding * n:
                    self.skipped += 1
                    return None
                b = larger
            else:
                self.admitted.add(b)
                if self.plan is not None:
                    self.plans[b] = self._plan_for(host.seq_group)
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
                               *self.cache.num_heads, self.model.device, buffers=self.plans[b])
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
            graph, logits, check = self.graphs[b]
            graph.replay()
            out = logits[:n]
            if check is not None:  # first replay: same inputs as the warm-up, so the same logits
                if isinstance(check, torch.Tensor):
                    same = bool(_agree(out, check[:n]))
                else:  # captured ahead: the check replay ran on the warm-up's padding inputs then
                    flag, event = check
                    event.synchronize()
                    same = bool(flag)
                if not same:
                    raise RuntimeError(f"graph replay of batch size {b} differs from eager")
                self.graphs[b] = (graph, logits, None)
                self.setup_seconds += time.perf_counter() - start
            return out
        except Exception as error:  # any capture/replay problem: keep the engine correct, drop the speed-up
            self._turn_off(error)
            return None

    def _turn_off(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}"
        warnings.warn(f"CUDA graphs turned off for this engine ({self.error}); decode steps run eagerly.")
        self.enabled = False
        self.graphs.clear()

    def prepare(self, seq_group: np.ndarray, remaining: np.ndarray) -> bool:
        """Capture now the graph a coming decode step of len(seq_group) sequences will take (their groups
        numbered as a step's host arrays number them; `remaining`: their expected tokens still to come), by
        the rules `run` applies, without waiting for the device (module docstring). Returns whether it
        captured (capture=False: admitted the size); False when graphs are off, the size is taken or not worth
        a graph, or memory is short."""
        n = seq_group.shape[0]
        if not self.enabled or n == 0 or n > self.sizes[-1]:
            return False
        b = self.size_for(n)
        if self.capture and b not in self.graphs:
            # the warm-up's activations, logits and the graph's pool come on top of the steps in flight (checked
            # at the size before _exact_size, which may only shrink it and adds it to the sizes)
            vocab = self.model.config.get_text_config().vocab_size
            need = 2 * (step_activation_bytes(self.model, b, self.model.dtype) + 4 * b * vocab)
            if torch.cuda.mem_get_info(self.model.device)[0] < need:
                return False
        if b not in self.admitted:
            b = self._exact_size(n, b, remaining)
        if b in self.graphs or (b in self.admitted and not self.capture):
            return False
        if b not in self.admitted and self.expected_steps(n, remaining) < self.min_capture_steps:
            return False
        start = time.perf_counter()
        try:
            if b not in self.admitted:
                self.admitted.add(b)
                if self.plan is not None:
                    self.plans[b] = self._plan_for(seq_group)
            if not self.capture:
                return True
            self._capture(b, self._check_step(b), ahead=True)
        except Exception as error:  # graphs off for this engine, as in run (a failed capture is not retried)
            self._turn_off(error)
            return False
        self.setup_seconds += time.perf_counter() - start
        self.ahead += 1
        return True

    def _check_step(self, b: int) -> Step:
        """Padding inputs for an ahead capture's warm-up and check replay (they write the scratch page only),
        with the first half of the rows in one group whose prefix is the scratch page's first token, so the
        check runs prefix tiles and the merge as well as own tiles. Every row holds one token that is not the
        pad token (whose embedding may be zeros, and zeros would pass any check); one token, since every row
        writes its KV to the same scratch slot."""
        self._reset_padding(0, b)
        self.input_ids[0, :b] = 2 if self.model.config.get_text_config().pad_token_id == 1 else 1
        half = b // 2
        self.seq_group[:half] = 0
        # fill_ on one-element slices: writing a Python int into one element copies a host scalar, which
        # synchronizes (session 11's sync-debug run found these two); a capture ahead must not wait
        self.prefix_pages[0, :1].fill_(self.cache.scratch_page)
        self.prefix_lens[:1].fill_(1)
        if self.plan is not None:
            seq_group = np.full(b, -1, dtype=np.int64)
            seq_group[:half] = 0
            plan_attention(np.arange(b + 1), np.ones(b, dtype=np.int64), seq_group, np.ones(1, dtype=np.int64),
                           *self.cache.num_heads, self.model.device, buffers=self.plans[b])
        return self._step(b, None)

    def _capture(self, b: int, static: Step, ahead: bool = False) -> None:
        """Capture size b's graph. The eager warm-up first (lazy initializations happen outside the capture;
        its logits check the first replay). ahead: no synchronize (the device may still run earlier steps:
        the capture only records), and the check replay runs now, its result kept on the host for `run`."""
        eager = self._run_static(b, static)
        if not ahead:
            torch.cuda.synchronize()
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
        graph = torch.cuda.CUDAGraph()
        self.cache.step = static
        try:
            with (_recording(graph, pool) if ahead else torch.cuda.graph(graph, pool=pool)):
                logits = self.forward(self.input_ids[:, :b], self.position_ids[:, :b], self.sample_index[:b])
        finally:
            self.cache.step = None
        check = eager
        if ahead:
            graph.replay()
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(_agree(logits, eager), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            check = (flag, event)
        self.graphs[b] = (graph, logits, check)


def _agree(out: torch.Tensor, eager: torch.Tensor) -> torch.Tensor:
    """Whether a replay's logits match the eager warm-up's (a device bool: NaNs disagree)."""
    eager = eager.float()
    return (out.float() - eager).abs().amax() <= 1e-2 * eager.abs().amax() + 1e-3


@contextlib.contextmanager
def _recording(graph: torch.cuda.CUDAGraph, pool):
    """torch.cuda.graph without its synchronize and cache emptying: record on the side stream torch's own
    captures use while the current stream's queued work still runs (nothing recorded executes here)."""
    if torch.cuda.graph.default_capture_stream is None:
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream()
    with torch.cuda.stream(torch.cuda.graph.default_capture_stream):
        graph.capture_begin(*(() if pool is None else (pool,)))
        try:
            yield
        finally:
            graph.capture_end()
