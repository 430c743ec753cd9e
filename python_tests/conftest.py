"""Test setup: without CUDA, Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here, before the package
is imported by any test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
