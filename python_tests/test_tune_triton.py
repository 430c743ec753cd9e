"""benchmarks/tools/tune_triton.py: every knob names a setting the Triton backend has (per element size where the knob
says so), and a sweep's setting is undone afterwards, the cached launch plans with it."""
import os
import sys

import pytest

pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools"))
import tune_triton  # noqa: E402
from gaqat_kernels.kernels import triton_lsq  # noqa: E402


@pytest.mark.parametrize("option,attr,per_size", [pytest.param(o, a, p, id=o) for o, a, p, _, _ in tune_triton.KNOBS])
def test_knobs_name_backend_settings(option, attr, per_size):
    value = getattr(triton_lsq, attr)
    assert isinstance(value, dict) == per_size
    if per_size:
        assert set(value) == {4, 2}


def test_applied_setting_is_undone_with_the_cached_plans():
    """A bf16 4096x11008 weight per column: 256-channel ROWS tiles of 2048 elements (8 rows), 1024 (4 rows) while
    the sweep's setting holds, 2048 again after; per-size knobs change only their element size."""
    def rows_per_tile():
        return triton_lsq._rows_plan(4096, 11008, 132, 4096, 2048, 4, 256)[1]

    split_before = dict(triton_lsq._SPLIT_TILE_BYTES)
    assert rows_per_tile() == 8
    with tune_triton.applied({"_ROWS_BACKWARD_TILE": 1024, "_SPLIT_TILE_BYTES": 1024}, 2):
        assert rows_per_tile() == 4
        assert triton_lsq._SPLIT_TILE_BYTES == {4: split_before[4], 2: 1024}
    assert rows_per_tile() == 8 and triton_lsq._SPLIT_TILE_BYTES == split_before
