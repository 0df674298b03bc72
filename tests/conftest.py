"""Without a GPU the Triton kernels run under Triton's interpreter: set it before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
