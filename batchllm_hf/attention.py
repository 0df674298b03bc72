"""The "batchllm" attention implementation for transformers' AttentionInterface.

transformers calls `batchllm_attention_forward(module, query, key, value, attention_mask, ...)` from every
attention layer. When the layer's cache is a batchllm cache, `key` is not a tensor but the object its
`update()` returned (see cache.py): it knows the shared-prefix layout and computes the attention itself.
Anything else (no cache, a DynamicCache, training, eval loss) is ordinary attention and goes to
transformers' own SDPA path unchanged.

The mask function is transformers' `sdpa_mask`: it builds the causal + padding mask over the columns the
cache reports through `get_mask_sizes` (the request's own tokens), which is what both paths need.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "batchllm"


@runtime_checkable
class SharedKV(Protocol):
    """What a batchllm cache layer's `update()` returns in place of key/value tensors."""

    def attend(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        """query (B, Hq, q, D) -> output (B, q, Hq, D)."""


def batchllm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if isinstance(key, SharedKV):
        if dropout:
            raise ValueError("batchllm shared-prefix attention is inference-only: set the model to eval() mode.")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return key.attend(query, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Register "batchllm" with transformers (idempotent; done at `import batchllm_hf`)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, batchllm_attention_forward)
    # Without a mask function, masking_utils returns None for unknown names and padded rows go silently wrong.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
