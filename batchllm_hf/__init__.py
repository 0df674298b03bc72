"""batchllm_hf: shared-prefix batch generation for HuggingFace transformers.

Importing the package registers attn_implementation="batchllm" with transformers.
"""

from . import attention as _attention
from . import kernels  # noqa: F401  (batchllm_hf.kernels, shipped from the repository's kernels/ folder)
from .cache import SharedPrefixCache, SharedPrefixKV
from .clustering import ClusterStats, PrefixGroup, PrefixPlan, cluster_prefixes
from .engine import Engine, EngineConfig, RequestOutput
from .generator import BatchGenerator, GeneratorStats

_attention.register()

__all__ = [
    "BatchGenerator", "ClusterStats", "Engine", "EngineConfig", "GeneratorStats", "RequestOutput", "PrefixGroup", "PrefixPlan", "SharedPrefixCache",
    "SharedPrefixKV", "cluster_prefixes",
]
__version__ = "0.1.0"
