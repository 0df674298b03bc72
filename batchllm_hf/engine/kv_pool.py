"""The engine's paged KV storage and the transformers Cache that exposes it to the model's own forward.

Per layer one k and one v tensor of shape (num_pages, page_size, Hkv, D) (kernels/paged.py's contract).
`PagedCache` is handed to the HF forward as its cache; each layer's `update()` writes the step's new KV at
the step's slots and returns a `PagedKV` in place of key/value tensors, whose `attend` the "batchllm"
attention function calls (attention.py). The cache claims no past (`get_seq_length() == 0`,
`get_mask_sizes(q) == (q, 0)`) and the engine passes explicit position ids, so transformers' sdpa_mask
skips the (T x T) mask (except while a CUDA graph is captured, when it builds one, which attend ignores):
the paged metadata carries all structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.utils import logging

from ..kernels import paged_attention
from ..kernels.paged import PagedAttentionMetadata, paged_attention_reference
from .paged_sdpa import StepShape, paged_attention_sdpa

logger = logging.get_logger(__name__)


def kv_dims(model) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder-only HF model."""
    config = model.config.get_text_config()
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, num_kv_heads, head_dim


def page_bytes(model, page_size: int, dtype: torch.dtype) -> int:
    num_layers, num_kv_heads, head_dim = kv_dims(model)
    return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def step_activation_bytes(model, tokens: int, dtype: torch.dtype, all_logits: bool = False) -> int:
    """A rough estimate of one step's activations at their peak, for `tokens` packed tokens: per token six
    hidden-sized tensors (residual, norm, q / k / v, attention output) and the MLP's gate, up and activation
    (three intermediate-sized; a mixture of experts: those of its active experts). all_logits: the model
    computes logits for every token (no `logits_to_keep`), vocabulary-sized each. Llama-3-8B at 16384
    tokens: 2.1 GiB in bf16."""
    config = model.config.get_text_config()
    hidden = config.hidden_size
    experts = getattr(config, "num_experts_per_tok", None)
    expert_size = getattr(config, "moe_intermediate_size", None)
    if experts and expert_size:
        intermediate = experts * expert_size
    else:
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 6 * hidden + 3 * intermediate + (config.vocab_size if all_logits else 0)
    return tokens * per_token * torch.empty((), dtype=dtype).element_size()


def pool_pages(model, page_size: int, dtype: torch.dtype, device: torch.device, fraction: float,
               step_tokens: int = 0, all_logits: bool = False) -> int:
    """Pages that fit in `fraction` of the free accelerator memory (after the model loaded), once a step of
    `step_tokens` tokens has its activations set aside (step_activation_bytes), but never more than half the
    free memory: a budget too large for the GPU then fails as an out-of-memory error in its first large step
    (BatchGenerator halves the budget and retries), not as a pool too small for any request. CPU: 4096."""
    if device.type != "cuda":
        return 4096
    free, _ = torch.cuda.mem_get_info(device)
    activations = step_activation_bytes(model, step_tokens, dtype, all_logits)
    if activations > free // 2:
        logger.warning("A step of max_batch_tokens=%d needs about %.1f GiB of activations, more than half of the "
                       "%.1f GiB free; lower max_batch_tokens if it runs out of memory.", step_tokens,
                       activations / 2**30, free / 2**30)
    free -= min(activations, free // 2)
    return max(1, int(free * fraction) // page_bytes(model, page_size, dtype) - 1)  # - 1: the scratch page


@dataclass
class Step:
    """What every layer needs for one forward: where the new tokens' KV goes and how they attend."""

    slots: torch.Tensor  # (T,) int64 flat slot per packed token
    meta: PagedAttentionMetadata
    shape: StepShape | None
    plan: object = None  # the Triton kernels' per-step work plan (shared by all layers)


@dataclass(frozen=True)
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    step: Step
    backend: str

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """query (1, Hq, T, D) of the packed step -> (1, T, Hq, D). The attention pattern is the step's paged
        metadata; a mask transformers builds anyway is ignored (it builds a causal (T, T) one while a CUDA
        graph is being captured, since it treats capture as tracing; that broke graph capture on the H200)."""
        q = query[0].transpose(0, 1)
        if self.backend == "triton":
            out = paged_attention(q, self.k_cache, self.v_cache, self.step.meta, scaling, plan=self.step.plan)
        elif self.backend == "sdpa":
            out = paged_attention_sdpa(q, self.k_cache, self.v_cache, self.step.meta, scaling, self.step.shape)
        else:
            out, _ = paged_attention_reference(q, self.k_cache, self.v_cache, self.step.meta, scaling)
        return out.unsqueeze(0)


class PagedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, cache: "PagedCache"):
        super().__init__()
        self.k_cache, self.v_cache, self._cache = k_cache, v_cache, cache
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self._cache.step
        num_kv_heads, head_dim = self.k_cache.shape[2:]
        # (1, Hkv, T, D) -> (T, Hkv, D) written at the step's flat slots
        self.k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, step.slots, key_states[0].transpose(0, 1))
        self.v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, step.slots, value_states[0].transpose(0, 1))
        kv = PagedKV(self.k_cache, self.v_cache, step, self._cache.backend)
        return kv, kv

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        return int(query_length if isinstance(query_length, int) else query_length.shape[0]), 0

    def get_max_length(self) -> int:
        return -1


class PagedCache(Cache):
    """The KV pool as a transformers Cache; `step` is set by the runner before each forward."""

    def __init__(self, model, num_pages: int, page_size: int, backend: str | None = None):
        """backend: "triton" (the kernels; default on CUDA when present), "sdpa" (paged_sdpa.py; default
        elsewhere) or "reference" (kernels/paged.py's loop)."""
        num_layers, num_kv_heads, head_dim = kv_dims(model)
        device, dtype = model.device, model.dtype
        # one extra page, never handed to the scheduler: padding rows of CUDA-graph steps write there
        self.num_pages, self.page_size, self.scratch_page = num_pages, page_size, num_pages
        if backend not in (None, "triton", "sdpa", "reference"):
            raise ValueError(f"backend must be 'triton', 'sdpa' or 'reference', got {backend!r}.")
        self.num_heads = (model.config.get_text_config().num_attention_heads, num_kv_heads, head_dim)
        self.backend = backend or ("triton" if device.type == "cuda" else "sdpa")
        self.step: Step | None = None
        self.attention_tma = None  # EngineConfig.attention_tma: TMA key loads (triton backend; None: prefill + graph decode)
        self.attention_pack = True  # EngineConfig.attention_pack: packed decode items (triton backend)
        # The Triton kernels never load a key past a sequence's length, so their pool needs no zero fill
        # (filling ~100 GiB took 0.2 s per engine on an H200); the torch paths gather whole pages and
        # mask afterwards, where stale NaN bit patterns would poison the masked product, so they get zeros.
        alloc = torch.empty if self.backend == "triton" else torch.zeros
        layers = []
        for _ in range(num_layers):
            k = alloc((num_pages + 1, page_size, num_kv_heads, head_dim), dtype=dtype, device=device)
            v = alloc((num_pages + 1, page_size, num_kv_heads, head_dim), dtype=dtype, device=device)
            layers.append(PagedLayer(k, v, self))
        super().__init__(layers=layers)
