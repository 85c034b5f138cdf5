"""pytest-benchmark over every case of ``sdae_fast.bench`` (the same cases as ``sdae-fast bench``).

Run with ``pytest benchmarks --benchmark-only``. On the GPU each timed call ends with a
synchronisation, so the figure is the device time of the call, with no L2 flush between calls; use
``sdae-fast bench`` for event timings with L2 flushed, bandwidth/FLOP fractions and peak memory.
"""
import pytest
import torch

from sdae_fast.bench import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = cases(DEVICE, quick=DEVICE == "cpu")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}|{c.shape}|{c.variant}".replace(" ", "_"))
def test_case(benchmark, case):
    fn = case.make()

    def call():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info.update(variant=case.variant, bytes=case.bytes, flops=case.flops, device=DEVICE)
    benchmark.pedantic(call, warmup_rounds=2, rounds=10 if DEVICE == "cpu" else 50)
