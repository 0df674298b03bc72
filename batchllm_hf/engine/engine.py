"""Engine: BatchLLM-style batch generation over an HF causal LM's own forward.

    engine = Engine(model, EngineConfig(max_batch_tokens=16384))
    outputs = engine.generate(prompts, GenerationConfig(max_new_tokens=64))   # list[RequestOutput]

Flow: prompts -> groups (shared prefixes, clustering.py) -> Scheduler (admission, token batching, pages)
-> ModelRunner (packed forward through the "batchllm" attention and the PagedCache) -> sampling.
The host schedules and launches step N+1 before it reads step N's tokens back (scheduler.py), so on a GPU
its per-step work overlaps the device's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import GenerationConfig

from ..attention import ATTN_IMPLEMENTATION
from ..clustering import flatten_prompts
from ..validation import check_model_supported
from .config import EngineConfig
from .decode_graphs import DecodeGraphs
from .fused_model import fused_ops
from .grouping import build_groups
from .kv_pool import PagedCache, pool_pages
from .runner import ModelRunner, keeps_logits
from .sampling import SamplingParams, sample_tensor
from .scheduler import Scheduler, Sequence, pages_for


@dataclass(frozen=True)
class RequestOutput:
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"


@dataclass
class EngineStats:
    requests: int = 0
    groups: int = 0  # groups with a shared prefix
    ungrouped: int = 0  # requests that run alone (no shared prefix)
    logical_prompt_tokens: int = 0
    physical_prompt_tokens: int = 0  # prefill tokens actually computed (recomputation included)
    output_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    num_pages: int = 0
    # host-side wall time per phase: schedule, launch (packing + the forward's launches), sample (sampling
    # launches + bookkeeping), wait (for a step's tokens: the only sync; the device's time shows up here)
    seconds: dict = field(default_factory=lambda: {"schedule": 0.0, "launch": 0.0, "sample": 0.0, "wait": 0.0,
                                                   "total": 0.0})
    # (seconds since start, prefix pages, own pages, tokens in step) after each step
    kv_timeline: list = field(default_factory=list)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / max(1e-9, self.seconds["total"])

    @property
    def prefix_saving(self) -> float:
        return 1.0 - self.physical_prompt_tokens / max(1, self.logical_prompt_tokens)


class Engine:
    def __init__(self, model, config: EngineConfig | None = None):
        check_model_supported(model)
        self.model = model
        self.config = (config or EngineConfig()).for_device(model.device)
        self.stats = EngineStats()
        self._cache: PagedCache | None = None
        self.decode_graphs: DecodeGraphs | None = None  # CUDA graphs of decode steps, built on first use

    def _kv_cache(self, needed_pages: int | None = None) -> PagedCache:
        """The KV pool: `num_pages` if set, else sized from free accelerator memory but no larger than
        `needed_pages` (what the job could ever hold at once: allocating ~100 GiB costs 0.2 s on an H200,
        a tenth of a small job). A later, larger job gets a larger pool."""
        cfg = self.config
        if cfg.num_pages is not None:
            if self._cache is None:
                self._cache = PagedCache(self.model, cfg.num_pages, cfg.page_size, cfg.attention_backend)
            return self._cache
        if self._cache is not None and (needed_pages is None or self._cache.num_pages >= needed_pages):
            return self._cache
        self._cache = self.decode_graphs = None  # the graphs hold the old pool's addresses
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        num_pages = pool_pages(self.model, cfg.page_size, self.model.dtype, self.model.device, cfg.kv_memory_fraction,
                               step_tokens=cfg.max_batch_tokens, all_logits=not keeps_logits(self.model))
        if needed_pages is not None:
            num_pages = min(num_pages, needed_pages)
        self._cache = PagedCache(self.model, num_pages, cfg.page_size, cfg.attention_backend)
        return self._cache

    def _runner(self, cache: PagedCache) -> ModelRunner:
        cache.attention_tma = self.config.attention_tma
        cache.attention_pack = self.config.attention_pack
        runner = ModelRunner(self.model, cache, shared_prefix=self.config.use_shared_prefix)
        if (self.decode_graphs is None and self.config.cuda_graphs and cache.backend == "triton"
                and self.model.device.type == "cuda"):
            max_size = min(self.config.max_graph_batch, self.config.max_batch_tokens)
            width = min(cache.num_pages, self.model.config.get_text_config().max_position_embeddings
                        // cache.page_size + 1)
            self.decode_graphs = DecodeGraphs(self.model, cache, runner.forward, max_size, width, capture=True,
                                              tail_padding=self.config.graph_tail_padding)
        if self.decode_graphs is not None:
            self.decode_graphs.forward = runner.forward
        runner.decode_graphs = self.decode_graphs
        return runner

    def generate(self, prompts: list[list[int]], generation_config: GenerationConfig | None = None, *,
                 max_new_tokens_per_request: list[int] | None = None, expected_new_tokens: list[int] | None = None,
                 seeds: list[int] | None = None, stop_token_ids: list[int] = (), on_finish=None) -> list[RequestOutput]:
        """Generate for every prompt (token id lists). Returns outputs in input order; with
        num_return_sequences = n, the n samples of prompt i are outputs i*n .. i*n+n-1.
        `on_finish(index, output)` is called as each request finishes."""
        gen = copy.deepcopy(generation_config or self.model.generation_config)
        if gen.eos_token_id is None:  # as generate does: the model's eos unless the config sets one
            gen.eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
        params = SamplingParams.from_generation_config(gen, stop_token_ids)
        n = int(gen.num_return_sequences or 1)
        flat = _check_prompts(prompts, self.model.config.get_text_config().vocab_size)
        count = len(prompts)
        max_new = _per_request(max_new_tokens_per_request, count, gen.max_new_tokens, "max_new_tokens_per_request")
        if gen.max_new_tokens is None and max_new_tokens_per_request is None:
            raise ValueError("Set generation_config.max_new_tokens (or max_new_tokens_per_request).")
        expected = _per_request(expected_new_tokens, count, None, "expected_new_tokens")
        seeds = _per_request(seeds, count, None, "seeds")
        cfg = self.config
        sequences = [
            Sequence(index=i * n + j, prompt=list(prompts[i]), max_new_tokens=max_new[i],
                     expected_new_tokens=min(max_new[i], expected[i] if expected[i] is not None else max_new[i]),
                     eos_ids=params.eos_ids, stop_ids=params.stop_ids)
            for i in range(count) for j in range(n)
        ]
        seed_of = [seeds[s.index // n] if seeds[s.index // n] is not None else s.index // n for s in sequences]
        groups = build_groups(sequences, n, cfg, flat)
        cache = self._kv_cache(sum(pages_for(len(g.prefix), cfg.page_size)
                                   + sum(pages_for(len(s.prompt) - len(g.prefix) + s.max_new_tokens, cfg.page_size)
                                         for s in g.members) for g in groups))
        scheduler = Scheduler(cache.num_pages, cfg.page_size, cfg.max_batch_tokens, cfg.max_num_seqs, cfg.decode_first)
        for group in groups:
            scheduler.add_group(group)
        self.stats = stats = EngineStats(requests=len(sequences), groups=sum(1 for g in groups if g.prefix),
                                         ungrouped=sum(len(g.members) for g in groups if not g.prefix),
                                         logical_prompt_tokens=sum(len(s.prompt) for s in sequences),
                                         num_pages=cache.num_pages)
        runner = self._runner(cache)
        outputs: list[RequestOutput | None] = [None] * len(sequences)
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        start = time.perf_counter()
        # Overlap: step N+1 is scheduled and launched before step N's tokens are read back, so the host's
        # work hides behind the device's (scheduler.py: advance / complete). A repetition penalty needs
        # every token on the host before the next step, so it runs one step at a time.
        overlap = cfg.overlap_steps and params.repetition_penalty == 1.0
        inflight = None  # (records, host tokens, event) of the last launched step
        previous_tokens = None  # its sampled tokens on the device

        def complete(flight):
            records, host_tokens, event = flight
            t = time.perf_counter()
            if event is not None:
                event.synchronize()
            tokens = host_tokens.tolist()
            stats.seconds["wait"] += time.perf_counter() - t
            for seq in scheduler.complete(records, tokens):
                outputs[seq.index] = RequestOutput(list(seq.output), seq.finish_reason)
                stats.output_tokens += len(seq.output)
                if on_finish is not None:
                    on_finish(seq.index, outputs[seq.index])

        # The glue kernels (RMSNorm, rotary, SiLU-mul) run fused for the whole job on CUDA (fused_model.py).
        with fused_ops(self.model, enabled=cfg.fused_ops):
            try:
                while not scheduler.done:
                    t0 = time.perf_counter()
                    chunks = scheduler.schedule()
                    if not chunks:
                        if inflight is not None:  # what is left waits on the last step's tokens
                            complete(inflight)
                            inflight = None
                            stats.kv_timeline.append((time.perf_counter() - start, *scheduler.pages_in_use(), 0))
                            continue
                        raise RuntimeError("The scheduler found nothing to run: the KV pool is too small for the "
                                           "admitted groups; give the engine more KV memory (EngineConfig.num_pages).")
                    t1 = time.perf_counter()
                    logits = runner.run(chunks, previous_tokens)
                    t2 = time.perf_counter()
                    picked = [c.seq for c in chunks if c.sample]
                    tokens = sample_tensor(
                        logits, params, seeds=[seed_of[s.index] for s in picked], keys=[s.index % n for s in picked],
                        positions=[len(s.prompt) + len(s.output) for s in picked],
                        num_generated=[len(s.output) for s in picked],
                        histories=[s.prompt + s.output for s in picked] if params.repetition_penalty != 1.0 else None,
                    ) if picked else torch.zeros(0, dtype=torch.long, device=logits.device)
                    stats.physical_prompt_tokens += sum(c.length for c in chunks if not (c.sample and c.length == 1
                                                                                         and c.seq.output))
                    records = scheduler.advance(chunks)
                    flight = (records, *_to_host(tokens))
                    t3 = time.perf_counter()
                    if inflight is not None:
                        complete(inflight)
                    if runner.decode_graphs is not None and any(not c.sample or c.length > 1 for c in chunks):
                        # the device is busy with this prefill step: capture the coming decode batch's graph
                        # meanwhile (its host time is in decode_graphs.setup_seconds), after the last step's
                        # tokens are in, so the sequences they finished are not counted
                        batch = scheduler.decode_batch_ahead()
                        if batch:
                            runner.prepare_decode_graph(batch)
                    inflight, previous_tokens = flight, tokens
                    if not overlap:
                        complete(inflight)
                        inflight = None
                    stats.steps += 1
                    stats.seconds["schedule"] += t1 - t0
                    stats.seconds["launch"] += t2 - t1
                    stats.seconds["sample"] += t3 - t2
                    stats.kv_timeline.append((time.perf_counter() - start, *scheduler.pages_in_use(),
                                              sum(c.length for c in chunks)))
            finally:
                self.model.set_attn_implementation(previous)
                stats.seconds["total"] = time.perf_counter() - start
                stats.preemptions = scheduler.num_preemptions
        return outputs


def _to_host(tokens: torch.Tensor):
    """Start copying a step's sampled tokens to the host: (host tensor, event to wait on or None)."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _per_request(values, count: int, default, name: str) -> list:
    if values is None:
        return [default] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts.")
    return values


def _check_prompts(prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raises ValueError for prompts that are not non-empty lists of token ids in [0, vocab_size); returns their
    (tokens, lengths) (clustering.flatten_prompts), which the clustering reuses."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a list of token id lists (one per request), e.g. tokenizer(texts).input_ids.")
    tokens, lengths = flatten_prompts(prompts)  # refuses empty, non-1-D and non-integer prompts
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        i = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        raise ValueError(f"Prompt {i} holds {int(tokens[bad[0]])}, not a token id in [0, {vocab_size}).")
    return tokens, lengths
