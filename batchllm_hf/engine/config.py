"""EngineConfig: the knobs a user of the BatchLLM engine sets (one small frozen dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one `Engine`.

    page_size:           tokens per KV page (a power of two). None (default): 64 on a CUDA GPU (whole 64-key
                         blocks: the prefill attention's TMA key loads), 16 elsewhere. A shared prefix keeps its
                         full length (its last page may be partial); with use_shared_prefix off, prefixes are
                         cut to whole pages (a member reads them as the first pages of its own table).
    max_batch_tokens:    token budget of one step (decode tokens + prefill chunks). Default 16384 (4096 until
                         session 9; the bench ran 8192): fewer, larger prefill steps pay the per-step costs
                         (launches, the decode tokens' attention) fewer times (session 9, H200: W-paper 9.26 s
                         against 9.46-9.67 s at 8192, with the tail padding below; W-8B and W-1B within run-to-run
                         noise). A step's activations grow with it (kv_pool.step_activation_bytes: 2.1 GiB for
                         Llama-3-8B at 16384), set aside before the KV pool is sized; BatchGenerator halves the
                         budget after an out-of-memory error.
    num_pages:           KV pool size in pages; None sizes it from free accelerator memory (CPU: 4096).
    kv_memory_fraction:  share of the free accelerator memory given to the KV pool, after the model loaded and
                         a step of max_batch_tokens has its activations set aside (kv_pool.step_activation_bytes).
    max_num_seqs:        cap on running requests; None = admission bounded by KV memory alone (BatchLLM's
                         memory-centric batching). Setting it is the "memory budget off" ablation.
    decode_first:        admit (and prefill) groups with the largest expected-decode / prefill ratio first, so
                         their decode steps run beside later groups' prefill. On a mixed workload (session 12,
                         benchmarks/decode_first_probe.py): 3.5-5.7% faster at a 2048-token budget, 1.7% with a
                         pool a quarter of the job's size, about nothing at the defaults or where every request
                         decodes as long.
    use_shared_prefix:   store and read a group's prefix once (off: each request runs its whole prompt).
    cluster:             group prompts by shared prefix (off: every prompt is a group of one).
    min_prefix_len:      shortest prefix worth a group (tokens); None = one page.
    cuda_graphs:         capture decode-only steps as CUDA graphs (ignored on CPU).
    max_graph_batch:     the largest decode step (sequences) run as a CUDA graph; sizes 1, 2, 4, ..., 256, then
                         multiples of 64 up to it (a step pads to the next size; a steady batch above 256
                         can take its own size, rounded up to 16: decode_graphs.py says when); larger decode
                         steps run eagerly. A size is captured once it will serve at least a few steps
                         (decode_graphs.py). Each captured size keeps its logits (a size of 1024 holds 256 MB
                         of bf16 logits for a 128k vocabulary; all 21 sizes up to 1024, if every one were
                         captured, 2.2 GB; the steady-batch sizes add at most one per 64-wide bucket); lower it
                         on a GPU with little memory left beside the KV pool.
    graph_tail_padding:  a decode step whose own size would serve too few steps to capture (the shrinking tail
                         of a job) pads into a captured larger size while that is at most this many times the
                         step's sequences, else runs eagerly (default 32; session 8's 2 ran W-paper's last
                         12 steps eagerly). An eager step of a 7B model is bound by the host's launches
                         (W-paper: 25 ms, 40-53 ms in slower runs); padded into a graph, W-paper took 9.53 s
                         against 9.66-9.70 s (session 9, one run; W-8B and W-1B within noise). Larger models'
                         padded steps cost more device time.
    attention_backend:   "triton", "sdpa" or "reference" (kv_pool.PagedCache); None picks the fastest here.
    overlap_steps:       launch step N+1 before reading step N's tokens back (same outputs; off: one step at
                         a time, the host idle while the device runs and the other way round).
    fused_ops:           on CUDA, run the model's RMSNorms, rotary embedding and SwiGLU activation as fused
                         Triton kernels (engine/fused_model.py; known Llama-family classes only) instead of
                         HF's chains of torch ops.
    attention_tma:       whether the triton backend reads whole key blocks through TMA tensor descriptors (Hopper
                         and later; pages of whole key blocks). None (default): where pages hold whole 64-key
                         blocks (page_size a multiple of 64, head_dim <= 128; kernels/attention_plan.tma_default)
                         in prefill steps (13-20% faster per chunk) and CUDA-graph decode steps (3-32% less time
                         per step, session 13), not in decode steps launched eagerly (the descriptors' host
                         time); True: in every step; False: never. Same outputs either way.
    attention_pack:      whether the triton backend reads the own KV of decode tokens with <= 128 own keys
                         (<= 256 in steps with TMA key loads, whose whole blocks then come through TMA) in
                         packed items (consecutive sequences' tokens in one 16-row tile and one pipelined key
                         loop, kernels/attention_plan._pack_decode) instead of one program per sequence and KV
                         head. Same outputs either way.
    """

    page_size: int | None = None
    max_batch_tokens: int = 16384
    num_pages: int | None = None
    kv_memory_fraction: float = 0.85
    max_num_seqs: int | None = None
    decode_first: bool = True
    use_shared_prefix: bool = True
    cluster: bool = True
    min_prefix_len: int | None = None
    cuda_graphs: bool = True
    max_graph_batch: int = 1024
    graph_tail_padding: float = 32.0
    attention_backend: str | None = None
    overlap_steps: bool = True
    fused_ops: bool = True
    attention_tma: bool | None = None
    attention_pack: bool = True

    def for_device(self, device) -> "EngineConfig":
        """This config with its device-dependent defaults filled in (page_size)."""
        if self.page_size is not None:
            return self
        return replace(self, page_size=64 if torch.device(device).type == "cuda" else 16)

    def __post_init__(self):
        if self.page_size is not None and (self.page_size < 1 or self.page_size & (self.page_size - 1)):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}.")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}.")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1 or None (size from free memory), got {self.num_pages}.")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}.")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 or None, got {self.max_num_seqs}.")
        if self.max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be >= 1, got {self.max_graph_batch}.")
        if not self.graph_tail_padding >= 1.0:  # NaN too
            raise ValueError(f"graph_tail_padding must be >= 1, got {self.graph_tail_padding}.")
        if self.attention_backend not in (None, "triton", "sdpa", "reference"):
            raise ValueError(f"attention_backend must be None, 'triton', 'sdpa' or 'reference', got "
                             f"{self.attention_backend!r}.")
        if self.min_prefix_len is not None and self.min_prefix_len < 1:
            raise ValueError(f"min_prefix_len must be >= 1 or None, got {self.min_prefix_len}.")
