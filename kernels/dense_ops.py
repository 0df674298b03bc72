"""Shared-prefix attention for the DENSE layout of the HF-generate cache, on the paged layout's Triton kernel.

Signature and math of `shared_prefix_attention_reference` (kernels/reference.py): query (B, Hq, q, D),
prefix_key/value (G, Hkv, P, D) with prefix_mask (G, P) left-padded, group_index (B,), own_key/value
(B, Hkv, T, D), own_mask (B, 1, q, T) bool or None (pure causal, queries = the last q keys).

The dense tensors ARE a paged layout with one page per row: own_key is a pool of B pages of (up to) 2^30
tokens whose page table for row b is [b], the prefix likewise with G pages; strides say where a token and
a head live. Left padding becomes each row's first visible key (the plan's own/prefix starts), so the
kernel reads no padding. Masks of any other form than "left padding (+ causal)" go to the reference.

`plan_dense_shared_prefix` checks the masks and plans (host syncs): make it once per forward and pass it
to every layer (`plan=`), the masks being the same for all layers. Off CUDA everything runs the reference.
Tested: tests/kernels/test_dense_shared_prefix.py under TRITON_INTERPRET=1 only (not yet on a GPU).
"""

from __future__ import annotations

import torch

from .attention_plan import PagedAttentionPlan, plan_attention
from .reference import shared_prefix_attention_reference

_ONE_PAGE = 1 << 30  # page size that holds a whole row: token t of row r is page r, slot t


def _host(t: torch.Tensor):
    return t.cpu().numpy().astype("int64")


def left_padding(mask: torch.Tensor) -> torch.Tensor:
    """(N, L) bool -> (N,) number of leading False entries."""
    return (~mask).to(torch.int32).cumprod(-1).sum(-1)


def plan_dense_shared_prefix(prefix_mask: torch.Tensor, group_index: torch.Tensor, own_mask: torch.Tensor | None,
                             q_len: int, own_len: int, num_q_heads: int, num_kv_heads: int,
                             head_dim: int) -> PagedAttentionPlan | None:
    """Plan for the dense layout, or None when a mask is not left padding (+ causal): use the reference."""
    device = prefix_mask.device
    batch, prefix_len = group_index.shape[0], prefix_mask.shape[1]
    prefix_pad = left_padding(prefix_mask)
    supported = torch.equal(prefix_mask, torch.arange(prefix_len, device=device)[None, :] >= prefix_pad[:, None])
    if own_mask is None:
        own_pad = torch.zeros(batch, dtype=torch.int32, device=device)
    else:
        mask = own_mask.expand(batch, 1, q_len, own_len)[:, 0]
        own_pad = left_padding(mask[:, -1])
        cols = torch.arange(own_len, device=device)[None, None, :]
        last_visible = own_len - q_len + torch.arange(q_len, device=device)[None, :, None]
        expected = (cols >= own_pad[:, None, None]) & (cols <= last_visible)
        supported = supported and torch.equal(mask, expected)
    if not supported:
        return None
    q_starts = torch.arange(batch + 1) * q_len
    return plan_attention(_host(q_starts), _host(torch.full((batch,), own_len)), _host(group_index),
                          _host(torch.full((prefix_mask.shape[0],), prefix_len)), num_q_heads, num_kv_heads,
                          head_dim, device, own_starts=_host(own_pad), prefix_starts=_host(prefix_pad))


def shared_prefix_attention_dense(query: torch.Tensor, prefix_key: torch.Tensor, prefix_value: torch.Tensor,
                                  prefix_mask: torch.Tensor, group_index: torch.Tensor, own_key: torch.Tensor,
                                  own_value: torch.Tensor, own_mask: torch.Tensor | None, scaling: float, *,
                                  plan: PagedAttentionPlan | None = None,
                                  force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Same inputs and outputs as `shared_prefix_attention_reference`: out (B, Hq, q, D) in the query's
    dtype, lse (B, Hq, q) fp32. Triton on CUDA (or force_triton, for interpreter tests), else the reference."""
    batch, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, own_len = own_key.shape[1], own_key.shape[2]
    if (query.is_cuda or force_triton) and plan is None:
        plan = plan_dense_shared_prefix(prefix_mask, group_index, own_mask, q_len, own_len, num_q_heads,
                                        num_kv_heads, head_dim)
    if not (query.is_cuda or force_triton) or plan is None:
        return shared_prefix_attention_reference(query, prefix_key, prefix_value, prefix_mask, group_index,
                                                 own_key, own_value, own_mask, scaling)
    for name, k, v in (("own", own_key, own_value), ("prefix", prefix_key, prefix_value)):
        if k.stride() != v.stride() or k.stride(3) != 1 or k.dtype != query.dtype:
            raise ValueError(f"{name} keys and values must share strides and the query's dtype, with a contiguous "
                             "head_dim axis.")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}.")
    from .shared_prefix_triton import launch_partial_attention  # triton only where kernels run

    packed = query.transpose(1, 2).reshape(batch * q_len, num_q_heads, head_dim)  # (T, Hq, D), a view for q=1
    device = query.device
    own_table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
    prefix_table = torch.arange(prefix_key.shape[0], dtype=torch.int32, device=device)[:, None]
    own_kv = (own_key, own_value, (own_key.stride(0), own_key.stride(2), own_key.stride(1)))
    prefix_kv = (prefix_key, prefix_value, (prefix_key.stride(0), prefix_key.stride(2), prefix_key.stride(1)))
    out, lse = launch_partial_attention(packed, num_kv_heads, own_kv, prefix_kv, own_table, prefix_table, _ONE_PAGE,
                                        scaling, plan, None, None)
    return (out.view(batch, q_len, num_q_heads, head_dim).transpose(1, 2),
            lse.view(batch, q_len, num_q_heads).transpose(1, 2))
