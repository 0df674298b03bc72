"""SharedPrefixCache: a transformers Cache that stores each shared prompt prefix's KV once per group.

Layout handed to `model.generate` by `SharedPrefixCache.from_inputs` (hf-integration.md, layout A):

    input_ids / attention_mask, row i:  [ prefix region: group prefix, left-padded to P ] [ suffix region:
                                          row i's own suffix, left-padded to S ]

The cache claims the first P columns as already cached (`get_seq_length() == P` before generation), so
generate feeds only the suffix region and computes position ids from the mask's cumulative sum: every
token keeps its position in the original prompt. Logits processors (repetition penalty, ...) see the
whole prompt.

KV storage per layer is the paged pool of kernels/paged.py, (num_pages, page_size, Hkv, D), carved into
fixed regions: group g's prefix in pages [g * Pp, (g + 1) * Pp), row i's own tokens (suffix + generated,
left padding dropped) in pages [G * Pp + i * Tp, ...). Both regions are also plain dense views
(G, Pp * page_size, Hkv, D) and (B, Tp * page_size, Hkv, D); Tp doubles when a row outgrows it.

`update()` writes the new KV and returns a `SharedPrefixKV` in place of key/value tensors; the "batchllm"
attention (attention.py) calls its `attend`: on CUDA the Triton kernels (batchllm_hf.kernels.paged_attention,
rows ordered by group so each prefix is read once per group), elsewhere the torch reference on the dense
views. Rows expanded by generate (num_return_sequences, beams) are detected at the first update; beam
reordering moves own KV, lengths and group index together; the prefix never moves.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from .grouping import group_prompts
from .kernels import paged_attention, plan_paged_attention
from .kernels.attention_ops import use_triton
from .kernels.paged import PagedAttentionMetadata
from .kernels.reference import shared_prefix_attention_reference
from .validation import check_attn_implementation, check_left_padded_inputs, check_model_supported

PAGE_SIZE = 16


class RowLayout:
    """Per-row bookkeeping shared by all layers of one cache (layer 0 advances it once per forward)."""

    def __init__(self, group_index: torch.Tensor, suffix_lens: torch.Tensor, prefix_lens: torch.Tensor,
                 prefix_pages: int):
        self.group_index = group_index                        # (B,) row -> group
        self.pending_pad = suffix_lens.max() - suffix_lens    # (B,) left padding of the suffix region
        self.own_lens = torch.zeros_like(suffix_lens)         # (B,) own tokens stored, after this step's write
        self.before = self.own_lens                           # (B,) own tokens stored before this step
        self.pad = self.pending_pad                           # (B,) padding queries of this step
        self.prefix_lens = prefix_lens                        # (G,)
        self.prefix_pages = prefix_pages                      # Pp: pages per group prefix
        self.own_pages = 1                                    # Tp: pages per row
        self.columns = 0                                      # mask columns fed after the prefix region
        self._step = None                                     # (order, inverse, meta, plan) of this step

    def begin_step(self, rows: int, q_len: int) -> None:
        if rows != self.group_index.shape[0]:
            known = self.group_index.shape[0]
            if rows % known or self.columns:
                raise ValueError(f"The cache was built for {known} rows but the model was called with {rows}.")
            # generate expanded the inputs (num_return_sequences / beams) but not the cache
            self.group_index, self.pending_pad, self.own_lens = (
                t.repeat_interleave(rows // known) for t in (self.group_index, self.pending_pad, self.own_lens))
        self.pad = self.pending_pad
        self.pending_pad = torch.zeros_like(self.pending_pad)
        self.before = self.own_lens
        self.own_lens = self.before + q_len - self.pad
        self.columns += q_len
        self.own_pages = max(self.own_pages, -(-int(self.own_lens.max()) // PAGE_SIZE))
        self._step = None

    def select(self, indices: torch.Tensor) -> None:
        self.group_index, self.own_lens, self.pending_pad = (
            t.index_select(0, indices) for t in (self.group_index, self.own_lens, self.pending_pad))

    def step_plan(self, num_q_heads: int, num_kv_heads: int, head_dim: int):
        """(order, inverse, meta, plan) of this step for the paged kernels: rows ordered by group so each
        group's members are one run; computed by the first layer, reused by the others."""
        if self._step is None:
            device = self.own_lens.device
            order = torch.argsort(self.group_index, stable=True)
            q_lens = (self.own_lens - self.before)[order]
            base = self.prefix_lens.shape[0] * self.prefix_pages
            own_pages = base + order[:, None] * self.own_pages + torch.arange(self.own_pages, device=device)
            groups = torch.arange(self.prefix_lens.shape[0], device=device)[:, None]
            prefix_pages = groups * self.prefix_pages + torch.arange(max(1, self.prefix_pages), device=device)
            meta = PagedAttentionMetadata(
                q_starts=torch.cat([q_lens.new_zeros(1), q_lens.cumsum(0)]).int(),
                own_lens=self.own_lens[order].int(), own_pages=own_pages.int(),
                seq_group=self.group_index[order].int(), prefix_pages=prefix_pages.int(),
                prefix_lens=self.prefix_lens.int(), page_size=PAGE_SIZE)
            plan = plan_paged_attention(meta, num_q_heads, num_kv_heads, head_dim)
            self._step = (order, torch.argsort(order), meta, plan)
        return self._step


@dataclass(frozen=True)
class SharedPrefixKV:
    """What `SharedPrefixLayer.update` returns as key and value: the layer, whose pool and row layout the
    attention reads."""

    layer: "SharedPrefixLayer"

    def attend(self, query: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
        """query (B, Hq, q, D) -> (B, q, Hq, D). The mask follows from the row layout (not read)."""
        layer, layout = self.layer, self.layer.layout
        batch, num_q_heads, q_len, head_dim = query.shape
        steps = torch.arange(q_len, device=query.device)[None, :] - layout.pad[:, None]   # (B, q); < 0: padding
        if use_triton(query):  # CUDA: the Triton kernels over the pool's pages
            order, inverse, meta, plan = layout.step_plan(num_q_heads, layer.keys.shape[2], head_dim)
            rows, valid = query.transpose(1, 2)[order], steps[order] >= 0
            packed = paged_attention(rows[valid].contiguous(), layer.keys, layer.values, meta, scaling, plan=plan)
            grouped = query.new_zeros(batch, q_len, num_q_heads, head_dim)
            grouped[valid] = packed
            return grouped[inverse]
        prefix_k, prefix_v, own_k, own_v = layer.dense_views(int(layout.own_lens.max()))
        prefix_mask = torch.arange(prefix_k.shape[2], device=query.device)[None, :] < layout.prefix_lens[:, None]
        keys = torch.arange(own_k.shape[2], device=query.device)
        own_mask = (keys[None, None, :] <= (layout.before[:, None] + steps)[:, :, None]) & (steps[:, :, None] >= 0)
        out, _ = shared_prefix_attention_reference(query, prefix_k, prefix_v, prefix_mask, layout.group_index,
                                                   own_k, own_v, own_mask[:, None], scaling)
        return out.transpose(1, 2).contiguous()


class SharedPrefixLayer(CacheLayerMixin):
    """One layer's paged pool: group prefixes (fixed) and every row's own tokens (growing)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layer_idx: int, layout: RowLayout, keys: torch.Tensor, values: torch.Tensor,
                 prefix_length: int):
        super().__init__()
        self.layer_idx, self.layout, self.prefix_length = layer_idx, layout, prefix_length
        self.keys, self.values = keys, values   # (num_pages, PAGE_SIZE, Hkv, D): prefix region, then own region
        self.rows_alloc, self.own_pages_alloc = 0, 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool exists from construction
        pass

    def _regions(self, pool: torch.Tensor, rows: int, own_pages: int):
        """Dense views of a pool: prefixes (G, Pp * ps, Hkv, D) and own tokens (rows, own_pages * ps, Hkv, D)."""
        groups = self.layout.prefix_lens.shape[0]
        split = groups * self.layout.prefix_pages
        prefix = pool[:split].view(groups, -1, *pool.shape[2:])
        own = pool[split:split + rows * own_pages].view(rows, own_pages * PAGE_SIZE, *pool.shape[2:])
        return prefix, own

    def _fit_pool(self) -> None:
        """Re-carve the own region after generate expanded the rows or a row outgrew its pages."""
        rows, own_pages = self.layout.group_index.shape[0], self.layout.own_pages
        if (rows, own_pages) == (self.rows_alloc, self.own_pages_alloc):
            return
        split = self.layout.prefix_lens.shape[0] * self.layout.prefix_pages
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((split + rows * own_pages, *old.shape[1:]))
            new[:split] = old[:split]
            if rows == self.rows_alloc and self.own_pages_alloc:
                _, old_own = self._regions(old, rows, self.own_pages_alloc)
                self._regions(new, rows, own_pages)[1][:, :old_own.shape[1]] = old_own
            setattr(self, name, new)
        self.rows_alloc, self.own_pages_alloc = rows, own_pages

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        layout = self.layout
        if self.layer_idx == 0:
            layout.begin_step(key_states.shape[0], key_states.shape[2])
        self._fit_pool()
        rows, q_len = key_states.shape[0], key_states.shape[2]
        steps = torch.arange(q_len, device=key_states.device)[None, :] - layout.pad[:, None]
        valid = steps >= 0   # left-padding positions of the suffix region are not stored
        row_idx = torch.arange(rows, device=key_states.device)[:, None].expand(rows, q_len)[valid]
        slot = (layout.before[:, None] + steps)[valid]
        for pool, new in ((self.keys, key_states), (self.values, value_states)):
            self._regions(pool, rows, self.own_pages_alloc)[1][row_idx, slot] = new.transpose(1, 2)[valid]
        shared = SharedPrefixKV(self)
        return shared, shared

    def dense_views(self, own_len: int):
        """(G, Hkv, Pp * ps, D) prefix K/V and (B, Hkv, own_len, D) own K/V, views of the pool."""
        rows = self.layout.group_index.shape[0]
        prefix_k, own_k = self._regions(self.keys, rows, self.own_pages_alloc)
        prefix_v, own_v = self._regions(self.values, rows, self.own_pages_alloc)
        return (prefix_k.transpose(1, 2), prefix_v.transpose(1, 2), own_k[:, :own_len].transpose(1, 2),
                own_v[:, :own_len].transpose(1, 2))

    def select_rows(self, indices: torch.Tensor) -> None:
        rows = self.layout.group_index.shape[0]
        for pool in (self.keys, self.values):
            own = self._regions(pool, rows, self.own_pages_alloc)[1]
            own.copy_(own.index_select(0, indices.to(own.device)))

    def get_seq_length(self) -> int:
        return self.prefix_length + self.layout.columns

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        # The mask covers the own-token columns; the attention takes both masks from the row layout.
        return self.layout.columns + query_length, self.prefix_length

    def get_max_length(self) -> int:
        return -1

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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(indices)
        self.layers[0].layout.select(indices.to(self.layers[0].layout.group_index.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.layers[0].layout.group_index.shape[0]
        self.batch_select_indices(torch.arange(rows).repeat_interleave(repeats))

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
        suffix_lens = [len(r) - n for r, n in zip(rows, prefix_len_of_row)]
        suffix_len = max(suffix_lens)
        new_ids = torch.full((len(rows), prefix_len + suffix_len), pad_id, dtype=input_ids.dtype)
        new_mask = torch.zeros((len(rows), prefix_len + suffix_len), dtype=torch.long)
        for i, (row, cut) in enumerate(zip(rows, prefix_len_of_row)):
            new_ids[i, prefix_len - cut:prefix_len] = torch.tensor(row[:cut], dtype=input_ids.dtype)
            new_mask[i, prefix_len - cut:prefix_len] = 1
            new_ids[i, prefix_len + suffix_len - len(row) + cut:] = torch.tensor(row[cut:], dtype=input_ids.dtype)
            new_mask[i, prefix_len + suffix_len - len(row) + cut:] = 1

        device = model.device
        prefix_pages = -(-prefix_len // PAGE_SIZE)
        layout = RowLayout(torch.tensor(group_of_row, device=device), torch.tensor(suffix_lens, device=device),
                           torch.tensor([len(p) for p in prefixes], device=device), prefix_pages)
        pools = _prefill_prefixes(model, prefixes, prefix_pages * PAGE_SIZE, pad_id, device)
        layers = [SharedPrefixLayer(i, layout, k, v, prefix_len) for i, (k, v) in enumerate(pools)]
        physical = sum(len(p) for p in prefixes) + sum(suffix_lens)
        stats = SharingStats(len(rows), len(prefixes), sum(len(r) for r in rows), physical)
        inputs = {"input_ids": new_ids.to(device), "attention_mask": new_mask.to(device)}
        return cls(layers, stats), inputs


@torch.no_grad()
def _prefill_prefixes(model, prefixes: list[list[int]], capacity: int, pad_id: int, device: torch.device):
    """Run every non-empty group prefix once; returns per layer the (K, V) prefix region of the pool,
    (G * capacity / PAGE_SIZE, PAGE_SIZE, Hkv, D), each group's tokens first in its own pages."""
    config = model.config.get_text_config()
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (len(prefixes), capacity, num_kv_heads, head_dim)
    pools = [(torch.zeros(shape, dtype=model.dtype, device=device), torch.zeros(shape, dtype=model.dtype, device=device))
             for _ in range(config.num_hidden_layers)]
    run = [g for g, p in enumerate(prefixes) if p]  # groups of one have no prefix to run
    if run:
        longest = max(len(prefixes[g]) for g in run)
        ids = torch.full((len(run), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(run), longest), dtype=torch.long)
        for i, g in enumerate(run):
            ids[i, longest - len(prefixes[g]):] = torch.tensor(prefixes[g])
            mask[i, longest - len(prefixes[g]):] = 1
        cache = DynamicCache()
        kwargs = {cache_argument_name(model): cache}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1
        model(input_ids=ids.to(device), attention_mask=mask.to(device),
              position_ids=(mask.cumsum(-1) - 1).clamp_min(0).to(device), use_cache=True, **kwargs)
        for (keys, values), layer in zip(pools, cache.layers):
            for i, g in enumerate(run):  # left-padded batch -> each group's tokens at the start of its pages
                keys[g, :len(prefixes[g])] = layer.keys[i, :, longest - len(prefixes[g]):].transpose(0, 1)
                values[g, :len(prefixes[g])] = layer.values[i, :, longest - len(prefixes[g]):].transpose(0, 1)
    return [(k.view(-1, PAGE_SIZE, *shape[2:]), v.view(-1, PAGE_SIZE, *shape[2:])) for k, v in pools]
