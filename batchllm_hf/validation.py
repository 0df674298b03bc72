"""Checks that run before any model work, each with an error that says what is wrong and what to do."""

from __future__ import annotations

import torch

from .attention import ATTN_IMPLEMENTATION


def check_model_supported(model) -> None:
    """Refuse models whose attention layers are not all full causal attention (v1 scope)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("batchllm_hf needs a transformers PreTrainedModel (an object with a .config).")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; batchllm_hf supports decoder-only causal LMs."
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ValueError(
                f"{type(model).__name__} has attention layers of type {other} (config.layer_types); batchllm_hf "
                "supports only full-attention layers (no sliding-window, chunked, linear or hybrid layers)."
            )
    sliding_window = getattr(text_config, "sliding_window", None)
    if sliding_window is not None and getattr(text_config, "use_sliding_window", True):
        raise ValueError(
            f"{type(model).__name__} uses sliding-window attention (config.sliding_window={sliding_window}); "
            "batchllm_hf supports only full attention. If the model was trained without it, set "
            "config.sliding_window = None before loading."
        )
    if getattr(text_config, "attention_chunk_size", None) is not None:
        raise ValueError(f"{type(model).__name__} uses chunked attention, which batchllm_hf does not support.")


def check_attn_implementation(model) -> None:
    current = getattr(model.config, "_attn_implementation", None)
    if current != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"The model uses attn_implementation={current!r}, but a SharedPrefixCache needs "
            f"{ATTN_IMPLEMENTATION!r}: `import batchllm_hf`, then load it with "
            f"from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r}) or call "
            f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})."
        )


def check_left_padded_inputs(input_ids, attention_mask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a left-padded batch; returns (input_ids, attention_mask as bool)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a 2-D tensor (batch, length), got {getattr(input_ids, 'shape', input_ids)!r}.")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor of the same shape as input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(getattr(attention_mask, 'shape', ()))}."
        )
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the model is on {device}; move it with .to({str(device)!r}).")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has no rows.")
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        row = int(torch.nonzero(lengths == 0)[0])
        raise ValueError(f"Row {row} of attention_mask is all zeros: every prompt needs at least one token.")
    # Left padding: once a row has a real token, every later column is real.
    real_from = input_ids.shape[1] - lengths
    expected = torch.arange(input_ids.shape[1], device=mask.device)[None, :] >= real_from[:, None]
    bad = (mask != expected).any(dim=1)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"Row {row} is not left-padded (its attention_mask has a 0 after a 1). Tokenize with "
            "tokenizer.padding_side = 'left', as for any decoder-only generate."
        )
    return input_ids, mask
