"""Instruction mix of each kernel's first loop in ``cuobjdump -sass`` output: what one iteration issues.

    cuobjdump -sass lsq.o > lsq.sass
    python benchmarks/tools/sass_loop_mix.py lsq.sass lsq_bwd_row_kernel ELi8ELi2ELb0E

prints, for every kernel whose mangled name holds all the given fragments, its instruction count, the loop
(from the first backward branch's target to that branch) and the loop's opcodes by count. Compares code
generation across dtypes or variants without a GPU; it says nothing about stalls.
"""
from __future__ import annotations

import argparse
import collections
import re

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def kernels(sass: str):
    """``(mangled name, [(address, instruction text)])`` of every function in the dump."""
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        yield name.strip(), [(int(a, 16), text) for a, text in INSTRUCTION.findall(body)]


def opcode(text: str) -> str:
    """The opcode's base name of one instruction, past a predicate (``@!P0 LDG.E.128`` -> ``LDG``)."""
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def first_loop(instructions):
    """The instructions from the first backward branch's target to that branch, or [] if there is none."""
    for i, (address, text) in enumerate(instructions):
        m = BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            target = int(m.group(1), 16)
            return [t for a, t in instructions[:i + 1] if a >= target]
    return []


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sass", help="a file of cuobjdump -sass output")
    p.add_argument("fragments", nargs="+", help="parts of the mangled kernel names to report")
    args = p.parse_args(argv)
    with open(args.sass) as f:
        sass = f.read()
    for name, instructions in kernels(sass):
        if all(fragment in name for fragment in args.fragments):
            loop = first_loop(instructions)
            mix = collections.Counter(opcode(t) for t in loop)
            print(f"{name}\n  {len(instructions)} instructions; first loop {len(loop)}: "
                  + " ".join(f"{k}:{v}" for k, v in mix.most_common()))


if __name__ == "__main__":
    main()
