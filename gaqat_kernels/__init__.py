"""gaqat_kernels: fused LSQ fake-quantization kernels and conflict-aware low-bit QAT.

Public entry points: ``lsq_fake_quant`` (the op), ``segment_conflict`` (per-layer gradient-conflict
statistics), ``available_backends``, ``checked_mode``, and the ``gaqat_kernels.nn`` modules.
"""
from .backends import available_backends
from .ops import checked_mode, lsq_fake_quant, segment_conflict

__all__ = ["lsq_fake_quant", "segment_conflict", "available_backends", "checked_mode"]
__version__ = "0.1.0"
