"""The sm_90 facts table of every Triton kernel variant (``sdae-fast info --kernels``, and
``python -m sdae_fast.kernel_table [--full] > docs/kernels.md``)."""
from __future__ import annotations

import sys

from . import kernel_variants, sm90

_LEGEND = """# Triton kernels compiled for sm_90 (H100/H200)

Generated offline with Triton {triton} by `python -m sdae_fast.kernel_table{flag} > docs/kernels.md`
(Triton's ptxas, read back with cuobjdump; no GPU involved). `tests/test_sm90_static.py` asserts the promises:
no spills (stack 0, no STL) where a kernel holds its tile in registers, no FFMA in EMA (bit-exact
against the reference), HGMMA (wgmma) for 16-bit attention at N <= 256, shared memory <= 227 KB.
Registers are per thread, stack bytes per thread, shared bytes per block; MMA is HGMMA (wgmma),
HMMA (mma.sync), FFMA (no tensor-core instruction but fused multiply-adds: exact fp32 dots, or
plain arithmetic in kernels without a dot) or - (neither).

fp32 top-K attention computes exact fp32 scores as FMA dots over 16-wide head-dim chunks (whole
rows would spill) and is refused above N = 256: there the one-tile selection spills 10-18 KB, and
the reference serves it (the multi-pass selection of N > 1024 would not spill, 32 score passes
instead of one; unmeasured, so not chosen). 16-bit top-K at N 513-1024 launches twice: the
selection (stage 1) stays on mma.sync, since wgmma needs 64 query rows a program, whose 64 × N_PAD
keys do not fit in registers (8 warps: 256 per thread; 16 warps cap a thread at 128 and spill
2.8 KB); the softmax and P@V (stage 2) read τ back and run 64-row tiles on wgmma.
"""


def table(full: bool = False) -> str:
    import triton

    lines = [_LEGEND.format(flag=" --full" if full else "", triton=triton.__version__), sm90.TABLE_HEADER]
    for group in sorted(kernel_variants.GROUPS):
        variants = kernel_variants.variants(group, full=full)
        for v, f in zip(variants, sm90.compile_facts([v.job for v in variants])):
            lines.append(f.table_row(v.note))
    return "\n".join(lines) + "\n"


def print_table(full: bool = False) -> int:
    try:
        print(table(full), end="")
    except sm90.ToolchainMissing as exc:
        print(f"no offline sm_90 compile here: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(print_table(full="--full" in sys.argv[1:]))
