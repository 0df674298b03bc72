"""Token sampling from a GenerationConfig, with stateless per-request randomness.

Processors follow transformers' generate order: repetition penalty, min_new_tokens (eos and stop ids
masked), then for sampling temperature, top-k, top-p. A sample is drawn by the Gumbel-max trick with
noise from a counter-based hash of (seed, sample key, token position, vocabulary id): a request's draw
depends on nothing but its own seed and position, so its output does not depend on the batch or step it
ran in, nor on the order requests were given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .transfer import upload

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    eos_ids: frozenset = frozenset()
    stop_ids: frozenset = frozenset()

    @classmethod
    def from_generation_config(cls, config, stop_token_ids=()) -> "SamplingParams":
        eos = config.eos_token_id
        eos_ids = frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)
        do_sample = bool(config.do_sample) and (config.temperature is None or config.temperature > 0)
        if getattr(config, "num_beams", 1) not in (None, 1):
            raise ValueError("The engine does not do beam search (num_beams > 1); use generate for that.")
        penalty = config.repetition_penalty if config.repetition_penalty is not None else 1.0
        if penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}.")
        top_p = config.top_p if config.top_p is not None and config.top_p < 1.0 else None
        top_k = config.top_k if config.top_k else None
        return cls(do_sample=do_sample, temperature=float(config.temperature or 1.0), top_k=top_k, top_p=top_p,
                   repetition_penalty=float(penalty), min_new_tokens=int(config.min_new_tokens or 0),
                   eos_ids=eos_ids, stop_ids=frozenset(stop_token_ids))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values (products wrap, low bits stay exact)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, V) uniforms in (0, 1), a pure function of (seed, key, position, vocabulary id) per element."""
    h = _mix32(seeds & _MASK32)
    h = _mix32(h ^ ((seeds >> 32) & _MASK32))
    h = _mix32(h ^ keys)
    h = _mix32(h ^ positions)
    vocab = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) + 0x9E3779B9)
    bits = _mix32(h[:, None] ^ vocab[None, :])
    return (bits.double() + 0.5) / 2.0**32


def apply_repetition_penalty(logits: torch.Tensor, histories: list[list[int]], penalty: float) -> torch.Tensor:
    rows = torch.cat([torch.full((len(h),), i, dtype=torch.long) for i, h in enumerate(histories)])
    cols = torch.cat([torch.tensor(h, dtype=torch.long) for h in histories])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[rows.to(logits.device), cols.to(logits.device)] = True
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


@functools.lru_cache(maxsize=8)
def _ban_mask(banned: tuple[int, ...], vocab_size: int, device: torch.device) -> torch.Tensor:
    ban = torch.zeros(vocab_size, dtype=torch.bool)
    ban[[b for b in banned if b < vocab_size]] = True
    return ban.to(device)


_EXACT_IN_FP32 = (torch.bfloat16, torch.float16, torch.float32)  # dtypes whose argmax equals their fp32 widening's


def sample_tensor(logits: torch.Tensor, params: SamplingParams, *, seeds: list[int], keys: list[int],
                  positions: list[int], num_generated: list[int],
                  histories: list[list[int]] | None) -> torch.Tensor:
    """logits (N, V) -> (N,) int64 token ids on logits' device, without waiting for the device (except with a
    repetition penalty). `histories` (prompt + output per row) only if penalized. Greedy picks on the logits
    as given when they are bf16, fp16 or fp32 (the argmax of half-precision logits is the argmax of their
    exact fp32 widening, first index on ties); fp64 logits are rounded to fp32 first, as HF generate rounds
    them (which can make ties). Penalties and sampling compute in fp32, as HF generate does."""
    device = logits.device
    if params.do_sample or params.repetition_penalty != 1.0 or logits.dtype not in _EXACT_IN_FP32:
        logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, histories, params.repetition_penalty)
    banned = sorted(params.eos_ids | params.stop_ids)
    if params.min_new_tokens and banned and any(n < params.min_new_tokens for n in num_generated):
        early = upload(torch.tensor([n < params.min_new_tokens for n in num_generated]), device)
        ban = _ban_mask(tuple(banned), logits.shape[-1], device)
        logits = logits.masked_fill(early[:, None] & ban[None, :], float("-inf"))
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    seeds_t, keys_t, positions_t = (upload(torch.tensor(v, dtype=torch.int64), device)
                                    for v in (seeds, keys, positions))
    u = uniform_noise(seeds_t, keys_t, positions_t, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (logits.double() + gumbel).argmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, **kwargs) -> list[int]:
    """`sample_tensor` as a list of token ids (waits for the device)."""
    return sample_tensor(logits, params, **kwargs).tolist()
