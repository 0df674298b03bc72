"""Fused kernels for the glue of HF's Llama-family decoder layers: RMSNorm, rotary embedding, SiLU-and-mul.

HF runs each of these as a chain of small torch ops, every one a kernel that reads and writes the whole
activation: RMSNorm is cast, pow, mean, add + rsqrt, mul, cast, mul; rotary is, for q and k each, mul,
neg, cat, mul, add; SwiGLU's activation is silu, then mul. On an H200 those chains took 24% of the GPU time
of a W-8B decode step and 24% of a W-8B prefill step (benchmarks/profile_engine.py --kernels). Here each is
one launch.

Numerics follow HF's formulas operation by operation: every intermediate that torch rounds to the
activation dtype (bf16 x bf16 products, the cast before RMSNorm's weight, silu's output) is rounded here
too. Outputs match HF's bit for bit except where the fp32 math itself differs: RMSNorm's mean (another
summation order) and reciprocal square root, and the exponential in silu; those are a few fp32 ulps, below
one bf16 ulp almost always (the tests allow one ulp, two for silu's double rounding).

The torch references (`*_reference`) are HF's formulas; tests compare both with HF's own modules.
Inference only (no backward). The engine swaps them in through batchllm_hf/engine/fused_model.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (round to nearest even, as torch does) and returned as fp32. bf16 is rounded
    by hand: Triton's CPU interpreter truncates fp32 -> bf16 casts, the GPU rounds them to nearest."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


# ---------------------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps,
                     BLOCK: tl.constexpr, INPUT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    # tl.reduce with the standard combiner: what tl.sum compiles to, and safe under the CPU interpreter.
    variance = tl.reduce(x * x, 0, tl.standard._sum_combine) / n_cols
    normed = _round(x * tl.math.rsqrt(variance + eps), INPUT_DTYPE)  # HF: hidden.to(input_dtype)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, _round(w * normed, OUT_DTYPE).to(OUT_DTYPE), mask=valid)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm, `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` over the last dim, in one launch."""
    n_cols = x.shape[-1]
    if x.dtype not in _TL_DTYPES or weight.dtype not in _TL_DTYPES:
        raise ValueError(f"rms_norm takes fp16, bf16 or fp32; got {x.dtype} and weight {weight.dtype}.")
    weight = weight.contiguous()
    if weight.shape != (n_cols,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}.")
    rows = x.reshape(-1, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(n_cols)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), n_cols, eps,
                                           BLOCK=block, INPUT_DTYPE=_TL_DTYPES[x.dtype],
                                           OUT_DTYPE=_TL_DTYPES[out.dtype],
                                           num_warps=min(16, max(1, block // 512)))
    return out.view(*x.shape[:-1], n_cols)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


# ---------------------------------------------------------------------------------------------- rotary


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_h, num_heads, c1, c2, s1, s2,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, DTYPE: tl.constexpr):
    """out = x * cos + rotate_half(x) * sin for the heads of one token, each product rounded as torch does."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    valid = (heads < num_heads)[:, None]
    first = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=valid, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1)
    out1 = _round(_round(x1 * c1, DTYPE) + _round((-x2) * s1, DTYPE), DTYPE)
    out2 = _round(_round(x2 * c2, DTYPE) + _round(x1 * s2, DTYPE), DTYPE)
    target = out_ptr + heads[:, None] * (2 * HALF) + dims[None, :]
    tl.store(target, out1.to(DTYPE), mask=valid)
    tl.store(target + HALF, out2.to(DTYPE), mask=valid)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_cb, stride_ct,
                   seq_len, num_q_heads, num_kv_heads,
                   HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, DTYPE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # b * seq_len + t
    b = token // seq_len
    t = token % seq_len
    dims = tl.arange(0, HALF)
    trig = b * stride_cb + t * stride_ct + dims
    c1 = tl.load(cos_ptr + trig).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + trig + HALF).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + trig).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + trig + HALF).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + b * stride_qb + t * stride_qt, q_out_ptr + token * num_q_heads * 2 * HALF, stride_qh,
                  num_q_heads, c1, c2, s1, s2, HALF, BLOCK_HQ, DTYPE)
    _rotate_heads(k_ptr + b * stride_kb + t * stride_kt, k_out_ptr + token * num_kv_heads * 2 * HALF, stride_kh,
                  num_kv_heads, c1, c2, s1, s2, HALF, BLOCK_HK, DTYPE)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1): q (B, Hq, T, D), k (B, Hkv, T, D),
    cos/sin (B, T, D) or (1, T, D). Returns (B, H, T, D) views of (B, T, H, D) memory, the layout the q/k projections
    had, so the attention's transposes need no copy."""
    batch, num_q_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim) or cos.shape[1:] != (seq_len, head_dim) \
            or cos.shape[0] not in (1, batch) or sin.shape != cos.shape or head_dim % 2 \
            or (head_dim // 2) & (head_dim // 2 - 1):
        raise ValueError(f"rotary expects q (B, Hq, T, D), k (B, Hkv, T, D) and cos/sin (B, T, D) with D/2 a power "
                         f"of two; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}.")
    dtype = torch.promote_types(q.dtype, cos.dtype)
    if k.dtype != q.dtype or sin.dtype != cos.dtype or dtype not in _TL_DTYPES:
        raise ValueError("q and k, and cos and sin, must share dtypes, among fp16/bf16/fp32.")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty((batch, seq_len, num_q_heads, head_dim), dtype=dtype, device=q.device)
    k_out = torch.empty((batch, seq_len, num_kv_heads, head_dim), dtype=dtype, device=q.device)
    if batch * seq_len:
        _rotary_kernel[(batch * seq_len,)](
            q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), seq_len, num_q_heads, num_kv_heads,
            HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(num_kv_heads), DTYPE=_TL_DTYPES[dtype], num_warps=4,
            enable_fp_fusion=False)  # no FMA: torch rounds the products before the add (fp32 too)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def rotary_reference(q, k, cos, sin):
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------------------------------------- SiLU * up


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), DTYPE)  # torch's silu, rounded to the dtype
    tl.store(out_ptr + offsets, _round(act * up, DTYPE).to(DTYPE), mask=valid)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` (HF's SwiGLU activation) in one launch."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in _TL_DTYPES:
        raise ValueError(f"gate and up must share shape and a dtype among fp16/bf16/fp32; got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}.")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 2048
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, DTYPE=_TL_DTYPES[gate.dtype],
                                                   num_warps=8)
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up
