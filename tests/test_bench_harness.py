"""``sdae_fast.bench.harness`` on the CPU: torch.compile baselines are built per case with static
shapes (their graph counts land in the measurement)."""
from __future__ import annotations

import pathlib

import torch

import sdae_fast.bench
from sdae_fast.bench import harness
from test_pretrain import _one_thread  # noqa: F401  (autouse: one torch thread on the shared CPU)


def test_compile_fresh_is_static_and_measure_counts_its_graphs():
    def make():
        double = harness.compile_fresh(lambda x: x * 2, backend="eager")
        return lambda: [double(torch.ones(n)) for n in (3, 5, 7)]

    m = harness.measure(harness.Case("double", "n=3,5,7", "compile(reference)", make), "cpu", warmup=1, reps=2)
    assert m.error is None, m.error
    # dynamic=False: one static graph per shape (automatic dynamic would have made 2, the second
    # one shape-generic); none of them built again after the first call.
    assert (m.graphs, m.graphs_timed) == (3, 0)
    again = harness.measure(harness.Case("double", "n=3,5,7", "compile(reference)", make), "cpu", warmup=1, reps=2)
    assert again.graphs == 3  # Dynamo's caches were reset: the next case starts from nothing


def test_no_case_module_compiles_outside_the_harness():
    """Every torch.compile baseline goes through harness.Compiled / compile_fresh (dynamic=False,
    Dynamo reset per case): a module-level torch.compile shared across shapes would turn dynamic and
    fall back to eager past the recompile limit, silently."""
    folder = pathlib.Path(sdae_fast.bench.__file__).parent
    offenders = [p.name for p in folder.glob("*.py")
                 if p.name != "harness.py" and "torch.compile(" in p.read_text().replace("``torch.compile(", "")]
    assert not offenders, offenders


class _FakeEvent:
    def __init__(self, log, **kwargs):
        self.log = log

    def record(self):
        self.log.append("event")

    def elapsed_time(self, other):
        return 1.0


def _fake_cuda(monkeypatch, log):
    monkeypatch.setattr(torch.cuda, "Event", lambda **kw: _FakeEvent(log, **kw))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    class Buffer:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda: Buffer())


def test_cuda_timing_flushes_l2_before_each_timed_call_outside_its_events(monkeypatch):
    log = []
    _fake_cuda(monkeypatch, log)
    times = harness.time_calls(lambda: log.append("call"), "cuda", warmup=1, reps=2)
    assert times == [1.0, 1.0]
    assert log == ["call"] + ["flush", "event", "call", "event"] * 2


def test_no_flush_when_the_case_opts_out_nor_on_the_cpu(monkeypatch):
    log = []
    _fake_cuda(monkeypatch, log)
    harness.time_calls(lambda: log.append("call"), "cuda", warmup=0, reps=1, flush_l2=False)
    assert log == ["event", "call", "event"]
    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda: (_ for _ in ()).throw(AssertionError("flushed")))
    assert len(harness.time_calls(lambda: None, "cpu", warmup=0, reps=3)) == 3
    host = harness.cases("cpu", True, ["host_overhead"])
    assert host and not any(c.flush_l2 for c in host)
