"""The BatchLLM engine: group scheduling and memory-centric token batching over an HF model's forward."""

from .config import EngineConfig
from .engine import Engine, EngineStats, RequestOutput

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput"]
