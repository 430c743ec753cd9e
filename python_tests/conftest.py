"""Test setup: without CUDA, Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here, before the package
is imported by any test module. torch.compile's on-disk caches are off: their keys do not cover the Python
autograd formulas registered for our operators, so a cached graph from an earlier version of this code
could pass a test that the current code fails.
"""
import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # read when torch is imported

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # the fuzz tests' budgets (test_fuzz.py); --hypothesis-profile=long picks the other one
    from hypothesis import HealthCheck, settings

    _checks = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, database=None,
                              suppress_health_check=_checks)
    settings.register_profile("long", max_examples=10_000, derandomize=True, deadline=None, database=None,
                              suppress_health_check=_checks)
    settings.load_profile("ci")
except ImportError:
    pass
