"""Public entry points of the shared-prefix attention: Triton on CUDA, the torch reference elsewhere.

    plan = plan_paged_attention(meta, Hq, Hkv, D)          # once per engine step (one host sync)
    out = paged_attention(q, k_cache, v_cache, meta, scaling, plan=plan)   # per layer

`paged_attention` is the general step of the paged contract (kernels/paged.py): decode tokens and prefill
chunks packed in one q, in one launch (+ one merge launch when some row has several partial results).
`shared_prefix_decode` / `shared_prefix_prefill` are the same kernel returning the log-sum-exp too, with
their argument checks (one query token per sequence for decode); tests and benchmarks use them.

CUDA graphs: pass a plan from `allocate_plan(...)` refilled by `plan_paged_attention(..., buffers=plan)`
before each replay, and a static `out`; the launch then does no host sync and allocates nothing that
depends on data (lse goes to `lse=` or a fresh (T, Hq) buffer of static size).
"""

from __future__ import annotations

import torch

from .attention_plan import PagedAttentionPlan, allocate_plan, plan_paged_attention
from .paged import PagedAttentionMetadata, paged_attention_reference

__all__ = ["allocate_plan", "paged_attention", "plan_paged_attention", "shared_prefix_decode",
           "shared_prefix_prefill", "use_triton"]


def use_triton(q: torch.Tensor) -> bool:
    """The dispatch rule: Triton kernels for CUDA tensors, the torch reference for anything else."""
    return q.is_cuda


def _attention_with_lse(q, k_cache, v_cache, meta, scaling, out, lse, plan, force_triton):
    if use_triton(q) or force_triton:
        from .shared_prefix_triton import launch_shared_prefix_attention  # triton only where kernels run

        if plan is None:
            plan = plan_paged_attention(meta, q.shape[1], k_cache.shape[2], q.shape[2])
        return launch_shared_prefix_attention(q, k_cache, v_cache, meta, scaling, plan, out=out, lse=lse)
    ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, scaling)
    if out is not None:
        ref_out = out.copy_(ref_out)
    if lse is not None:
        ref_lse = lse.copy_(ref_lse)
    return ref_out, ref_lse


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata,
                    scaling: float, *, out: torch.Tensor | None = None,
                    plan: PagedAttentionPlan | None = None) -> torch.Tensor:
    """One step's attention: q (T, Hq, D) -> (T, Hq, D) in q's dtype. See the module docstring."""
    return _attention_with_lse(q, k_cache, v_cache, meta, scaling, out, None, plan, False)[0]


def shared_prefix_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: PagedAttentionMetadata, scaling: float, *, out: torch.Tensor | None = None,
                         lse: torch.Tensor | None = None, plan: PagedAttentionPlan | None = None,
                         force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode step (one query token per sequence: q_starts = 0..S): returns out (S, Hq, D) and lse (S, Hq).

    The shape check needs no host sync (T == number of sequences). `force_triton` runs the kernels on a
    non-CUDA device (TRITON_INTERPRET=1 tests)."""
    if q.shape[0] != meta.num_seqs:
        raise ValueError(f"decode takes one query token per sequence: q has {q.shape[0]} tokens for "
                         f"{meta.num_seqs} sequences; use shared_prefix_prefill or paged_attention for chunks.")
    return _attention_with_lse(q, k_cache, v_cache, meta, scaling, out, lse, plan, force_triton)


def shared_prefix_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: PagedAttentionMetadata, scaling: float, *, out: torch.Tensor | None = None,
                          lse: torch.Tensor | None = None, plan: PagedAttentionPlan | None = None,
                          force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked prefill (any q_len per sequence, the chunk's KV already written to the pages): each token
    attends to its group's whole prefix and causally to its own KV. Returns out (T, Hq, D), lse (T, Hq)."""
    return _attention_with_lse(q, k_cache, v_cache, meta, scaling, out, lse, plan, force_triton)
