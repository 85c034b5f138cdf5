"""Static sm_90 tier: compile every kernel variant the dispatcher can pick (offline, no GPU) and
check the compiled code — what the interpreter cannot see.

By default a representative subset of the SPEC shapes (a few seconds each, cached across runs by
``sdae_fast.sm90``); ``SDAE_FAST_SM90=full`` compiles every dtype × head dim × N bucket × pruned
autotune config (minutes; run before merging a kernel change).
"""
import os

import pytest

from sdae_fast import kernel_variants, sm90

FULL = os.environ.get("SDAE_FAST_SM90") == "full"
pytest.importorskip("triton")


@pytest.fixture(scope="module", params=sorted(kernel_variants.GROUPS))
def compiled(request):
    variants = kernel_variants.variants(request.param, full=FULL)
    try:
        facts = sm90.compile_facts([v.job for v in variants])
    except sm90.ToolchainMissing as exc:
        pytest.skip(str(exc))
    return list(zip(variants, facts))


def _offenders(compiled, bad):
    return "\n".join(f.row() for v, f in compiled if bad(v, f))


def test_tiles_held_in_registers_do_not_spill(compiled):
    def spills(v, f):
        return f.stack > v.stack_ok if v.stack_ok else f.spills

    assert not (bad := _offenders(compiled, lambda v, f: v.registers and spills(v, f))), f"spills:\n{bad}"


def test_bit_exact_kernels_have_no_fma_contraction(compiled):
    # FFMA rounds a·b + c once; the reference rounds the product and the sum separately.
    assert not (bad := _offenders(compiled, lambda v, f: v.exact and f.sass.get("FFMA", 0))), f"FFMA:\n{bad}"


def test_scaled_logits_are_not_contracted_into_an_fma(compiled):
    """DINO's s · (1/Ts) and (t - c) · (1/Tt), rounded before the subtraction that follows in both
    sweeps: fused, a product would round once in one sweep and twice in the other, and once in the
    float path but twice in the tensor-temperature path, which sharpens in torch and runs at Tt = 1
    (the interpreter never fuses)."""
    assert not (bad := _offenders(compiled, lambda v, f: set(v.no_fma) & set(f.fma_params))), f"FMA:\n{bad}"


def test_16_bit_attention_runs_on_wgmma_up_to_256_tokens(compiled):
    assert not (bad := _offenders(compiled, lambda v, f: v.hgmma and f.mma != "HGMMA")), f"not HGMMA:\n{bad}"


def test_shared_memory_fits_one_sm90_block(compiled):
    assert not (bad := _offenders(compiled, lambda v, f: f.shared > sm90.SHARED_LIMIT)), f"> 227 KB:\n{bad}"


def test_facts_read_from_the_cubin():
    """The EMA kernel with FMA contraction left on has FFMA; the launched options have none."""
    from sdae_fast.kernels import ema

    job = kernel_variants.ema(full=False)[0].job
    fused = dict(job, options=dict(ema.LAUNCH_OPTIONS, enable_fp_fusion=True), label="fused")
    try:
        facts = sm90.compile_facts([job, fused])
    except sm90.ToolchainMissing as exc:
        pytest.skip(str(exc))
    assert facts[0].sass.get("FFMA", 0) == 0 and facts[0].sass.get("FADD", 0) > 0
    assert facts[1].sass.get("FFMA", 0) > 0
    assert facts[0].registers > 0 and facts[0].stack == 0 and facts[0].mma == "-"
