"""The "batchllm" attention and its torch reference against transformers' own SDPA attention."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from batchllm_hf.kernels.reference import (attention_with_lse, merge_attention_states,
                                           shared_prefix_attention_reference)
from hf_models import left_pad, model_pair, shared_prefix_prompts, tiny_config


class FakeModule(torch.nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.num_key_value_groups = ratio
        self.is_causal = True


def random_layout(batch, groups, num_kv_heads, ratio, head_dim, prefix_len, own_len, q_len, seed):
    """Random shared-prefix state plus the equivalent dense (B, Hkv, P + T, D) KV and mask for SDPA."""
    g = torch.Generator().manual_seed(seed)
    group_index = torch.randint(0, groups, (batch,), generator=g)
    prefix_lens = torch.randint(0, prefix_len + 1, (groups,), generator=g)
    prefix_mask = torch.arange(prefix_len)[None, :] >= (prefix_len - prefix_lens)[:, None]  # left-padded
    own_lens = torch.randint(q_len, own_len + 1, (batch,), generator=g)
    own_pad = torch.arange(own_len)[None, :] >= (own_len - own_lens)[:, None]
    pk = torch.randn(groups, num_kv_heads, prefix_len, head_dim, generator=g)
    pv = torch.randn(groups, num_kv_heads, prefix_len, head_dim, generator=g)
    ok = torch.randn(batch, num_kv_heads, own_len, head_dim, generator=g)
    ov = torch.randn(batch, num_kv_heads, own_len, head_dim, generator=g)
    q = torch.randn(batch, num_kv_heads * ratio, q_len, head_dim, generator=g)
    causal = torch.arange(own_len)[None, :] <= torch.arange(own_len - q_len, own_len)[:, None]
    own_mask = (causal[None] & own_pad[:, None, :])[:, None]  # (B, 1, q, T)
    dense_mask = torch.cat([prefix_mask[group_index][:, None, None, :].expand(-1, 1, q_len, -1), own_mask], dim=-1)
    dense_k = torch.cat([pk[group_index], ok], dim=2)
    dense_v = torch.cat([pv[group_index], ov], dim=2)
    return q, (pk, pv, prefix_mask, group_index, ok, ov), dense_k, dense_v, dense_mask


@pytest.mark.parametrize("prefix_len,own_len,q_len", [(1, 1, 1), (13, 5, 1), (127, 13, 13), (128, 20, 4),
                                                      (1025, 3, 1), (0, 6, 6)])
@pytest.mark.parametrize("ratio", [1, 4, 7])
def test_shared_prefix_reference_matches_sdpa_on_concatenated_kv(prefix_len, own_len, q_len, ratio):
    q, shared, k, v, mask = random_layout(batch=6, groups=3, num_kv_heads=2, ratio=ratio, head_dim=32,
                                          prefix_len=prefix_len, own_len=own_len, q_len=q_len, seed=prefix_len + ratio)
    ours, _ = shared_prefix_attention_reference(q, *shared, mask[..., prefix_len:], scaling=0.2)
    ours = ours.transpose(1, 2)
    ref, _ = sdpa_attention_forward(FakeModule(ratio), q, k, v, mask, scaling=0.2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_attention_with_lse_matches_logsumexp():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 5, 16, generator=g), torch.randn(3, 9, 16, generator=g), torch.randn(3, 9, 16, generator=g))
    mask = torch.rand(3, 5, 9, generator=g) > 0.3
    mask[0, 0] = False  # a fully masked row
    out, lse = attention_with_lse(q, k, v, mask, 0.5)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    torch.testing.assert_close(out, probs @ v)
    assert torch.all(out[0, 0] == 0) and lse[0, 0] == float("-inf")


def test_merge_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 7, 8, generator=g), torch.randn(4, 20, 8, generator=g), torch.randn(4, 20, 8, generator=g)
    o1, l1 = attention_with_lse(q, k[:, :11], v[:, :11], None, 0.3)
    o2, l2 = attention_with_lse(q, k[:, 11:], v[:, 11:], None, 0.3)
    merged, lse = merge_attention_states(o1, l1, o2, l2)
    full, full_lse = attention_with_lse(q, k, v, None, 0.3)
    torch.testing.assert_close(merged, full)
    torch.testing.assert_close(lse, full_lse)


def test_plain_forward_and_training_fall_back_to_sdpa():
    """Without a SharedPrefixCache a "batchllm" model is an SDPA model: same loss, same gradients."""
    ours, plain = model_pair(tiny_config("llama"))
    ids, mask = left_pad(shared_prefix_prompts(seed=3))
    labels = ids.masked_fill(mask == 0, -100)
    for model in (ours, plain):
        model.train()
        model.zero_grad()
    loss_ours = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_plain = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_ours.backward()
    loss_plain.backward()
    torch.testing.assert_close(loss_ours, loss_plain)
    grad_ours = ours.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(grad_ours, plain.model.layers[0].self_attn.q_proj.weight.grad)
    assert grad_ours.abs().sum() > 0
