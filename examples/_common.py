"""Shared by the examples: a local model from --model PATH, or the embedded random demo model on CPU."""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import batchllm_hf  # noqa: F401  (registers attn_implementation="batchllm")
from batchllm_hf.demo import demo_model, demo_tokenizer


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="local model folder; default: a tiny random Llama on CPU")
    return p


def load(model_path: str | None):
    """(model, tokenizer, word) where word(i) makes the i-th vocabulary word of this tokenizer (for
    synthetic text that tokenizes to known tokens on the demo tokenizer and to something on any other)."""
    if model_path is None:
        return demo_model(), demo_tokenizer(), lambda i: f"w{6 + i % 1000}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto" if device == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return model.to(device).eval(), tokenizer, lambda i: words[i % len(words)]
