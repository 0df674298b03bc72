"""Plain-PyTorch reference math for shared-prefix attention (dense layout).

This is the math every batchllm_hf attention path must agree with, and the reference the Triton kernels
are tested against. For member queries Q of a group with shared prefix KV (Kp, Vp) and the member's own
KV (Ko, Vo) (BatchLLM, arXiv 2412.03594, section 3.3; Hydragen, arXiv 2402.05099):

    Op, Lp = attention(Q, Kp, Vp)              no causal mask: every member token comes after the prefix
    Oo, Lo = attention(Q, Ko, Vo, own_mask)    causal + padding over the member's own tokens
    O      = (e^Lp Op + e^Lo Oo) / (e^Lp + e^Lo)   computed stably (max subtracted)

where L is the natural-log log-sum-exp of the scaled scores. The prefix part is computed per GROUP: the
queries of all members of a group (members x query heads per KV head x query tokens) are stacked into
one matrix and multiplied with the group's prefix keys once, so the prefix KV is read once per group.

Everything is computed in fp32 and cast back. Rows with no visible key (padding queries, empty prefixes)
get output 0 and log-sum-exp -inf instead of NaN, so they never poison a cache.
"""

from __future__ import annotations

import torch

# Bound on the fp32 score matrix materialised at once by the reference (elements); larger problems are
# processed in row chunks so a long prefill does not allocate tens of GB.
_MAX_SCORE_ELEMENTS = 1 << 27


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention that also returns the log-sum-exp.

    query (..., M, D), key/value (..., N, D), mask broadcastable to (..., M, N) with True = attend (or None).
    Returns out (..., M, D) in fp32 and lse (..., M) in fp32; fully masked rows give out 0, lse -inf.
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs, value.float()) / denom.clamp_min(torch.finfo(torch.float32).tiny)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets: out (..., D) with lse (...)."""
    lse_max = torch.maximum(lse_a, lse_b)
    lse_max = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    weight_a = torch.exp(lse_a - lse_max)
    weight_b = torch.exp(lse_b - lse_max)
    denom = weight_a + weight_b
    out = (out_a * weight_a.unsqueeze(-1) + out_b * weight_b.unsqueeze(-1)) / denom.clamp_min(
        torch.finfo(torch.float32).tiny
    ).unsqueeze(-1)
    return out, lse_max + torch.log(denom)


def group_member_table(group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(num_groups, max_members) table of row indices per group, padded with -1 (a host sync: reference only)."""
    counts = torch.bincount(group_index, minlength=num_groups)
    order = torch.argsort(group_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel(), device=order.device) - starts[group_index[order]]
    table = torch.full((num_groups, int(counts.max().item()) if order.numel() else 0), -1, dtype=torch.long,
                       device=group_index.device)
    table[group_index[order], slot] = order
    return table


def prefix_attention_reference(
    query: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    prefix_mask: torch.Tensor,
    group_index: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every row's queries over its group's shared prefix, each prefix read once per group.

    query (B, Hq, q, D); prefix_key/value (G, Hkv, P, D); prefix_mask (G, P) bool; group_index (B,) long.
    Returns out (B, Hq, q, D) fp32 and lse (B, Hq, q) fp32.
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    num_groups, num_kv_heads, prefix_len, _ = prefix_key.shape
    ratio = num_q_heads // num_kv_heads
    out = query.new_zeros((batch, num_q_heads, q_len, head_dim), dtype=torch.float32)
    lse = query.new_full((batch, num_q_heads, q_len), float("-inf"), dtype=torch.float32)
    if batch == 0 or prefix_len == 0:
        return out, lse
    table = group_member_table(group_index, num_groups)  # (G, M)
    max_members = table.shape[1]
    rows_per_member = ratio * q_len
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, num_groups * num_kv_heads * rows_per_member * prefix_len))
    mask = prefix_mask[:, None, None, :]  # (G, 1, 1, P)
    for start in range(0, max_members, chunk):
        members = table[:, start:start + chunk]  # (G, m)
        valid = members >= 0
        # (G, m, Hq, q, D) -> (G, Hkv, m * ratio * q, D): one matrix per (group, KV head)
        stacked = query[members.clamp_min(0)].view(num_groups, -1, num_kv_heads, ratio, q_len, head_dim)
        stacked = stacked.permute(0, 2, 1, 3, 4, 5).reshape(num_groups, num_kv_heads, -1, head_dim)
        part_out, part_lse = attention_with_lse(stacked, prefix_key, prefix_value, mask, scaling)
        part_out = part_out.view(num_groups, num_kv_heads, -1, ratio, q_len, head_dim).permute(0, 2, 1, 3, 4, 5)
        part_lse = part_lse.view(num_groups, num_kv_heads, -1, ratio, q_len).permute(0, 2, 1, 3, 4)
        rows = members[valid]
        out[rows] = part_out[valid].reshape(-1, num_q_heads, q_len, head_dim)
        lse[rows] = part_lse[valid].reshape(-1, num_q_heads, q_len)
    return out, lse


def own_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over each row's own KV. query (B, Hq, q, D), key/value (B, Hkv, T, D) with T >= q;
    mask (B, 1, q, T) bool (True = attend) or None for pure causal with the queries as the last q keys."""
    batch, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    ratio = num_q_heads // num_kv_heads
    if mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= q_pos)[None, None]
    # Fold the query heads that share a KV head into the row dimension: (B, Hkv, ratio * q, D).
    folded = query.reshape(batch, num_kv_heads, ratio * q_len, head_dim)
    mask = mask.expand(batch, 1, q_len, kv_len).unsqueeze(2).expand(batch, 1, ratio, q_len, kv_len)
    mask = mask.reshape(batch, 1, ratio * q_len, kv_len)
    out, lse = attention_with_lse(folded, key, value, mask, scaling)
    return out.view(batch, num_q_heads, q_len, head_dim), lse.view(batch, num_q_heads, q_len)


def shared_prefix_attention_reference(
    query: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    prefix_mask: torch.Tensor,
    group_index: torch.Tensor,
    own_key: torch.Tensor,
    own_value: torch.Tensor,
    own_mask: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full shared-prefix attention: prefix part per group, own part per row, merged by log-sum-exp.

    Shapes as in `prefix_attention_reference` and `own_attention_reference`. Returns out (B, Hq, q, D)
    in the query's dtype and lse (B, Hq, q) in fp32.
    """
    prefix_out, prefix_lse = prefix_attention_reference(query, prefix_key, prefix_value, prefix_mask, group_index,
                                                        scaling)
    own_out, own_lse = own_attention_reference(query, own_key, own_value, own_mask, scaling)
    out, lse = merge_attention_states(prefix_out, prefix_lse, own_out, own_lse)
    return out.to(query.dtype), lse
