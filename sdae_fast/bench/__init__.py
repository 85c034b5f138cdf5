"""Benchmark cases shared by ``sdae-fast bench`` and the pytest-benchmark suites in ``benchmarks/``.

Each module here (one per op family) registers case generators with :func:`register`. A case is
one variant (fused / naive / compiled / an existing alternative) of one op at one shape.
"""
from .harness import Case, Measurement, cases, measure, register

__all__ = ["Case", "Measurement", "cases", "measure", "register"]
