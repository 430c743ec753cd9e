"""benchmarks/tools/profile_op.py: --case must name exactly one kernel-benchmark case, and the error lists them."""
import os
import sys

import pytest

pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools"))
import profile_op  # noqa: E402


@pytest.mark.parametrize("case,matched", [("no such case", 0), ("weight", 4)])
def test_case_must_name_one_benchmark_case(case, matched, tmp_path, capsys):
    with pytest.raises(SystemExit):
        profile_op.main(["--out", str(tmp_path), "--case", case])
    err = capsys.readouterr().err
    assert f"matched {matched}" in err and "act 64x256x56x56 per-tensor" in err
