"""Run an HF model with the fused glue kernels (kernels/fused_ops.py) in place of its torch op chains.

    with fused_ops(model) as swapped:     # swapped: how many modules / functions now run fused kernels
        model(...)

Inside the block, and only there:
  * every RMSNorm module of a known class runs `rms_norm` (one launch instead of eight),
  * every SwiGLU MLP of a known class runs `silu_mul` between its projections (its Linear layers as they are),
  * the model's modeling module's `apply_rotary_pos_emb` runs `rotary` (one launch for q and k).
Known classes: those whose forward is exactly HF's Llama formula (Llama, Qwen2, Qwen3, Mistral). Others
(Gemma's 1 + weight norm, biased or non-SiLU MLPs, partial rotary) are left as they are, as is a module
whose forward something else already replaced (accelerate hooks). On exit everything is put back, even
after an error. Tensors that need gradients, or are not on a device where the kernels run, take HF's
own path, as do shapes and dtypes the kernels do not take (head_dim / 2 not a power of two, fp64). The
engine enters this around a whole generate call (EngineConfig.fused_ops); the rotary swap is a module
global, so another model of the same architecture running in another thread at the same time would take
the fused path too (same results). On exit only what is still this block's own is put back: a forward or
function someone else installed inside the block stays. If a kernel raises (say, it does not compile on
some device), the block warns once and HF's ops run for the rest of it.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch

_NORM_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
_MLP_CLASSES = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
_ROTARY_MODULES = {f"transformers.models.{name}.modeling_{name}" for name in ("llama", "qwen2", "qwen3", "mistral")}


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Swap:
    """What one `fused_ops` block shares: whether to run off CUDA, and whether a kernel has failed (then
    every swapped call takes HF's path for the rest of the block, after one warning)."""

    def __init__(self, force: bool):
        self.force = force
        self.error: str | None = None

    def runs(self, x: torch.Tensor) -> bool:
        """Inference only (the kernels have no backward: with gradients on, HF's path keeps weights' grads)."""
        return (self.error is None and (x.is_cuda or self.force) and not torch.is_grad_enabled()
                and x.dtype in _DTYPES)

    def call(self, fused, original, *args):
        try:
            return fused(*args)
        except Exception as error:  # e.g. a kernel that does not compile here: keep going on HF's path
            self.error = f"{type(error).__name__}: {error}"
            warnings.warn(f"fused kernels turned off for this run ({self.error}); HF's own ops run instead.")
            return original(*args)


def _swapped_forward(original, swap: _Swap, fused):
    """A module forward of one tensor that runs `fused` where the swap allows, else the original."""
    def forward(x):
        if not swap.runs(x):
            return original(x)
        return swap.call(fused, original, x)

    return forward


def _norm_forward(module, swap: _Swap):
    def fused(hidden_states):
        from ..kernels.fused_ops import rms_norm

        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return _swapped_forward(module.forward, swap, fused)


def _mlp_forward(module, swap: _Swap):
    def fused(x):
        from ..kernels.fused_ops import silu_mul

        return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))

    return _swapped_forward(module.forward, swap, fused)


def _rotary_function(original, swap: _Swap):
    def fused(q, k, cos, sin):
        from ..kernels.fused_ops import rotary

        return rotary(q, k, cos, sin)

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        half = q.shape[-1] // 2
        if (unsqueeze_dim != 1 or kwargs or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3
                or cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2 or half & (half - 1)
                or cos.shape[0] not in (1, q.shape[0]) or cos.shape != sin.shape
                or k.dtype != q.dtype or sin.dtype != cos.dtype or cos.dtype not in _DTYPES
                or not swap.runs(q)):
            return original(q, k, cos, sin, unsqueeze_dim, **kwargs)
        return swap.call(fused, original, q, k, cos, sin)

    apply_rotary_pos_emb.batchllm_original = original
    return apply_rotary_pos_emb


def _from_transformers(module) -> bool:
    """A class of transformers' own modeling code (a remote-code class may reuse a name with another formula)."""
    return type(module).__module__.startswith("transformers.models.")


def _swappable_mlp(module) -> bool:
    config = getattr(module, "config", None)
    act = getattr(config, "hidden_act", None)
    return (act in ("silu", "swish") and all(getattr(module, name, None) is not None
                                             for name in ("gate_proj", "up_proj", "down_proj")))


def _restore_forward(module, installed):
    def undo():
        if module.__dict__.get("forward") is installed:  # still ours: someone else's stays
            del module.__dict__["forward"]
    return undo


def _restore_rotary(modeling, installed, original):
    def undo():
        if getattr(modeling, "apply_rotary_pos_emb", None) is installed:
            modeling.apply_rotary_pos_emb = original
    return undo


@contextlib.contextmanager
def fused_ops(model: torch.nn.Module, *, enabled: bool = True, force: bool = False):
    """Swap in the fused kernels for the duration of the block (see the module docstring). `force` runs
    them on any device (the CPU tests, under TRITON_INTERPRET=1); otherwise CUDA tensors only."""
    undo = []
    swap = _Swap(force)
    try:
        if enabled:
            for module in model.modules():
                name = type(module).__name__
                if "forward" in module.__dict__:  # already replaced by someone else: leave it
                    continue
                if not _from_transformers(module):
                    continue
                if name in _NORM_CLASSES and hasattr(module, "variance_epsilon"):
                    module.forward = _norm_forward(module, swap)
                elif name in _MLP_CLASSES and _swappable_mlp(module):
                    module.forward = _mlp_forward(module, swap)
                else:
                    continue
                undo.append(_restore_forward(module, module.forward))
                if type(module).__module__ in _ROTARY_MODULES:
                    modeling = sys.modules[type(module).__module__]
                    current = getattr(modeling, "apply_rotary_pos_emb", None)
                    if current is not None and not hasattr(current, "batchllm_original"):
                        fused = modeling.apply_rotary_pos_emb = _rotary_function(current, swap)
                        undo.append(_restore_rotary(modeling, fused, current))
        yield len(undo)
    finally:
        for step in reversed(undo):
            step()
