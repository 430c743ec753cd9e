"""Loads the compiled extension ``gaqat_kernels._C`` (CPU C++, and CUDA C++ when it was built with CUDA).

The package works without it: ``MODULE`` is None and the reference/Triton backends remain. Availability is
decided once, at import, into plain constants, so that ``torch.compile`` never traces into the extension.
"""
from __future__ import annotations

from typing import Optional

try:
    from gaqat_kernels import _C as MODULE  # type: ignore[attr-defined]
    LOAD_ERROR: Optional[str] = None
except ImportError as e:  # not built, or built against another torch
    MODULE = None
    LOAD_ERROR = str(e)

HAS_CPU: bool = MODULE is not None
HAS_CUDA: bool = MODULE is not None and bool(MODULE.built_with_cuda())
