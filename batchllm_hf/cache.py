"""SharedPrefixCache: a transformers Cache that stores each shared prompt prefix's KV once per group.

Layout handed to `model.generate` by `SharedPrefixCache.from_inputs` (hf-integration.md, layout A):

    input_ids / attention_mask, row i:  [ prefix region: group prefix, left-padded to P ] [ suffix region:
                                          row i's own suffix, left-padded to S ]

The cache claims the first P columns as already cached (`get_seq_length() == P` before generation), so
generate feeds only the suffix region, and computes position ids from the mask's cumulative sum: every
token keeps the position it has in the original prompt. Logits processors (repetition penalty, ...) see
the whole prompt. Per layer the cache keeps:

    prefix_keys/values (G, Hkv, P, D) + prefix_mask (G, P)   one copy per group, filled once
    keys/values        (B, Hkv, T, D)                          each row's own tokens: suffix + generated
    group_index        (B,)                                    row -> group

`update()` appends the new own KV and returns a `SharedPrefixKV` view in place of key/value tensors;
the "batchllm" attention (attention.py) calls its `attend`. Rows expanded by generate (num_return_sequences,
beams) are detected at the first update and the row -> group map is expanded with them; beam reordering
moves own KV and group index together, the prefix never moves.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from .grouping import group_prompts
from .kernels.reference import shared_prefix_attention_reference
from .validation import check_attn_implementation, check_left_padded_inputs, check_model_supported


@dataclass(frozen=True)
class SharedPrefixKV:
    """What `SharedPrefixLayer.update` returns as key and value: everything one layer's attention needs."""

    prefix_keys: torch.Tensor
    prefix_values: torch.Tensor
    prefix_mask: torch.Tensor
    group_index: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise ValueError(f"batchllm attention expects a boolean mask from sdpa_mask, got {attention_mask.dtype}.")
        out, _ = shared_prefix_attention_reference(
            query, self.prefix_keys, self.prefix_values, self.prefix_mask, self.group_index,
            self.keys, self.values, attention_mask, scaling,
        )
        return out.transpose(1, 2).contiguous()


class SharedPrefixLayer(CacheLayerMixin):
    """One layer: the group prefixes' KV (fixed) and every row's own KV (grows)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, prefix_mask: torch.Tensor,
                 group_index: torch.Tensor):
        super().__init__()
        self.prefix_keys = prefix_keys
        self.prefix_values = prefix_values
        self.prefix_mask = prefix_mask
        self.group_index = group_index
        self.prefix_length = prefix_keys.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            rows, known = key_states.shape[0], self.group_index.shape[0]
            if rows != known:
                # generate expanded the inputs (num_return_sequences / beams) but not the cache.
                if rows % known:
                    raise ValueError(f"The cache was built for {known} rows but the model was called with {rows}.")
                self.group_index = self.group_index.repeat_interleave(rows // known)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        shared = SharedPrefixKV(self.prefix_keys, self.prefix_values, self.prefix_mask, self.group_index,
                                self.keys, self.values)
        return shared, shared

    def get_seq_length(self) -> int:
        own = self.keys.shape[-2] if self.is_initialized else 0
        return self.prefix_length + own

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        # The mask covers the own-token columns only; the prefix columns are handled by prefix_mask.
        return self.get_seq_length() - self.prefix_length + query_length, self.prefix_length

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = indices.to(self.group_index.device)
        self.group_index = self.group_index.index_select(0, indices)
        if self.is_initialized:
            self.keys = self.keys.index_select(0, indices.to(self.keys.device))
            self.values = self.values.index_select(0, indices.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.group_index = self.group_index.repeat_interleave(repeats)
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        raise NotImplementedError("A SharedPrefixCache holds prefilled prefixes; build a new one with from_inputs.")


@dataclass(frozen=True)
class SharingStats:
    requests: int
    groups: int
    logical_prompt_tokens: int
    physical_prompt_tokens: int

    @property
    def saving(self) -> float:
        return 1.0 - self.physical_prompt_tokens / max(1, self.logical_prompt_tokens)


def cache_argument_name(model) -> str:
    """transformers 5.17 calls it `past_key_values`; newer 5.x `cache` (old name deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SharedPrefixCache(Cache):
    """A Cache holding each group's prompt prefix once; build it with `from_inputs`."""

    def __init__(self, layers: list[SharedPrefixLayer], stats: SharingStats):
        super().__init__(layers=layers)
        self.stats = stats

    @classmethod
    def from_inputs(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    min_prefix_len: int = 1) -> tuple["SharedPrefixCache", dict[str, torch.Tensor]]:
        """Group the rows of a left-padded batch by shared prefix and prefill each prefix once.

        Returns the cache and the `input_ids`/`attention_mask` to pass to `model.generate` together with it
        (rows in the caller's order; row i of the result answers row i of `input_ids`).
        """
        check_model_supported(model)
        check_attn_implementation(model)
        input_ids, mask = check_left_padded_inputs(input_ids, attention_mask, model.device)
        rows = [ids[m].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu())]
        prefixes, group_of_row, prefix_len_of_row = group_prompts(rows, min_prefix_len=min_prefix_len)
        pad_id = int(input_ids[~mask][0]) if bool((~mask).any()) else int(input_ids[0, 0])

        prefix_len = max((len(p) for p in prefixes), default=0)
        suffix_len = max(len(r) - n for r, n in zip(rows, prefix_len_of_row))
        new_ids = torch.full((len(rows), prefix_len + suffix_len), pad_id, dtype=input_ids.dtype)
        new_mask = torch.zeros((len(rows), prefix_len + suffix_len), dtype=torch.long)
        for i, (row, cut) in enumerate(zip(rows, prefix_len_of_row)):
            if cut:
                new_ids[i, prefix_len - cut:prefix_len] = torch.tensor(row[:cut])
                new_mask[i, prefix_len - cut:prefix_len] = 1
            own = row[cut:]
            new_ids[i, prefix_len + suffix_len - len(own):] = torch.tensor(own)
            new_mask[i, prefix_len + suffix_len - len(own):] = 1

        device = model.device
        group_index = torch.tensor(group_of_row, dtype=torch.long, device=device)
        prefix_kv, prefix_mask = _prefill_prefixes(model, prefixes, prefix_len, pad_id, device)
        layers = [SharedPrefixLayer(k, v, prefix_mask, group_index) for k, v in prefix_kv]
        logical = sum(len(r) for r in rows)
        physical = sum(len(p) for p in prefixes) + sum(len(r) - n for r, n in zip(rows, prefix_len_of_row))
        stats = SharingStats(len(rows), len(prefixes), logical, physical)
        inputs = {"input_ids": new_ids.to(device), "attention_mask": new_mask.to(device)}
        return cls(layers, stats), inputs


@torch.no_grad()
def _prefill_prefixes(model, prefixes: list[list[int]], prefix_len: int, pad_id: int, device: torch.device):
    """Run every non-empty group prefix once (left-padded to prefix_len); returns per-layer (K, V) of shape
    (G, Hkv, prefix_len, D) and the (G, prefix_len) mask of real prefix tokens."""
    num_groups = len(prefixes)
    mask = torch.zeros((num_groups, prefix_len), dtype=torch.bool)
    ids = torch.full((num_groups, prefix_len), pad_id, dtype=torch.long)
    for g, prefix in enumerate(prefixes):
        if prefix:
            ids[g, prefix_len - len(prefix):] = torch.tensor(prefix)
            mask[g, prefix_len - len(prefix):] = True
    config = model.config.get_text_config()
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_layers = config.num_hidden_layers
    dtype = model.dtype
    keys = [torch.zeros((num_groups, num_kv_heads, prefix_len, head_dim), dtype=dtype, device=device)
            for _ in range(num_layers)]
    values = [torch.zeros_like(k) for k in keys]
    run = [g for g, p in enumerate(prefixes) if p]
    if run and prefix_len:
        # Groups of one (empty prefix) are not run; a prefix-only batch keeps padding within the batch short.
        cache = DynamicCache()
        position_ids = (mask[run].long().cumsum(-1) - 1).clamp_min(0)
        kwargs = {cache_argument_name(model): cache}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1
        model(input_ids=ids[run].to(device), attention_mask=mask[run].long().to(device),
              position_ids=position_ids.to(device), use_cache=True, **kwargs)
        index = torch.tensor(run, device=device)
        for layer_idx, layer in enumerate(cache.layers):
            keys[layer_idx][index] = layer.keys
            values[layer_idx][index] = layer.values
    return list(zip(keys, values)), mask.to(device)
