"""benchmarks/tools/sass_loop_mix.py reads cuobjdump's SASS listing: kernels by name fragments, the first loop's
instructions (backward branch to its target), opcodes past predicates."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools"))
import sass_loop_mix  # noqa: E402

LISTING = """
	code for sm_90
		Function : _Z6kernelIfEvPf
	.headerflags	@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                              /* 0x0000000000007919 */
        /*0020*/              @!P0 LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;       /* 0x000000040204a981 */
        /*0030*/                   FFMA R5, R4, R4, R5 ;                           /* 0x0000000404057223 */
        /*0040*/                   FFMA R6, R4, R4, R6 ;                           /* 0x0000000404067223 */
        /*0050*/               @P1 BRA 0x20 ;                                      /* 0xfffffffc00001947 */
        /*0060*/                   EXIT ;                                          /* 0x000000000000794d */
        /*0070*/                   BRA 0x70;                                       /* 0xfffffffc00fc7947 */
		..........

		Function : _Z6kernelI6__halfEvPS0_
        /*0000*/                   EXIT ;                                          /* 0x000000000000794d */
"""


def test_first_loop_and_opcodes():
    found = dict(sass_loop_mix.kernels(LISTING))
    assert list(found) == ["_Z6kernelIfEvPf", "_Z6kernelI6__halfEvPS0_"]
    loop = sass_loop_mix.first_loop(found["_Z6kernelIfEvPf"])
    assert [sass_loop_mix.opcode(t) for t in loop] == ["LDG", "FFMA", "FFMA", "BRA"]
    assert sass_loop_mix.first_loop(found["_Z6kernelI6__halfEvPS0_"]) == []


def test_main_reports_only_matching_kernels(tmp_path, capsys):
    path = tmp_path / "k.sass"
    path.write_text(LISTING)
    sass_loop_mix.main([str(path), "kernelIf"])
    out = capsys.readouterr().out
    assert "_Z6kernelIfEvPf" in out and "__half" not in out
    assert "8 instructions; first loop 4: FFMA:2 LDG:1 BRA:1" in out
