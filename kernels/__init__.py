"""Attention kernels of batchllm_hf, installed as `batchllm_hf.kernels`.

`reference` holds the plain-PyTorch math (the contract); Triton kernels live beside it and are tested
against it.
"""

from .attention_ops import (
    allocate_plan,
    paged_attention,
    plan_paged_attention,
    shared_prefix_decode,
    shared_prefix_prefill,
)
from .attention_plan import PagedAttentionPlan
from .reference import (
    attention_with_lse,
    merge_attention_states,
    own_attention_reference,
    prefix_attention_reference,
    shared_prefix_attention_reference,
)

__all__ = [
    "PagedAttentionPlan",
    "allocate_plan",
    "paged_attention",
    "plan_paged_attention",
    "shared_prefix_decode",
    "shared_prefix_prefill",
    "attention_with_lse",
    "merge_attention_states",
    "own_attention_reference",
    "prefix_attention_reference",
    "shared_prefix_attention_reference",
]
