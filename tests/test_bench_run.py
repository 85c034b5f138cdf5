"""``sdae_fast.bench.report.run`` on the lent GPU's terms: the report is on disk after every case
(a kill part-way loses only the case in flight), a time budget stops starting cases and lists the
rest, a SIGTERM (``timeout``) still writes the report, and the commit is recorded without ``.git``.
Stand-in cases and stubbed ceilings: nothing heavy is timed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from sdae_fast.bench import harness, report
from test_pretrain import _one_thread  # noqa: F401  (autouse: one torch thread on the shared CPU)


@pytest.fixture
def group(monkeypatch):
    """``register(makes)``: a case group ``fakerun`` of one case per ``(variant, make, slow)``."""
    harness.cases("cpu", True)  # the real case modules first, so the registry is complete
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda device: 10.0)
    monkeypatch.setattr(harness, "matmul_tflops", lambda device: 0.1)
    monkeypatch.delenv(report.BUDGET_ENV, raising=False)
    monkeypatch.setattr(report, "_git_commit", lambda: "abc123")  # no git subprocess inside the budget

    def register(specs):
        def gen(device, quick):
            return [harness.Case("fakerun", "n=1", v, make=m, slow=slow) for v, m, slow in specs]

        monkeypatch.setitem(harness._GENERATORS, "fakerun", gen)

    return register


def _noop():
    return lambda: None


def _report(tmp_path):
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_report_is_on_disk_after_each_case(tmp_path, group):
    seen = []

    def peek():  # the second case's make reads what the run has written so far
        data, md = _report(tmp_path)
        seen.append(([r["variant"] for r in data["results"]], data["run"]["status"], md))
        return lambda: None

    group([("naive", _noop, False), ("fused", peek, False)])
    report.run("cpu", True, ["fakerun"], str(tmp_path), reps=1)
    (variants, status, md), = seen
    assert variants == ["naive"] and status.startswith("running") and "| fakerun | n=1 | naive |" in md
    data, md = _report(tmp_path)
    assert [r["variant"] for r in data["results"]] == ["naive", "fused"] and data["run"]["status"] == "complete"
    assert not list(tmp_path.glob("*.tmp"))


def test_time_budget_stops_starting_cases_and_lists_the_rest(tmp_path, group):
    def slow_make():
        time.sleep(0.6)
        return lambda: None

    group([("naive", slow_make, False), ("fused", _noop, False), ("other", _noop, False)])
    report.run("cpu", True, ["fakerun"], str(tmp_path), reps=1, time_budget=0.5)
    data, md = _report(tmp_path)
    assert [r["variant"] for r in data["results"]] == ["naive"]
    assert [s["variant"] for s in data["run"]["skipped"]] == ["fused", "other"]
    assert "time budget of 0.5 s" in data["run"]["status"] and data["run"]["time_budget_s"] == 0.5
    assert "- fakerun | n=1 | fused" in md and "1 cases measured, 2 not run" in md


def test_budget_from_the_environment_and_slow_cases_last(tmp_path, group, monkeypatch):
    order = []

    def tracked(name, sleep=0.0):
        def make():
            order.append(name)
            time.sleep(sleep)
            return lambda: None
        return make

    group([("model", tracked("model"), True), ("naive", tracked("naive"), False),
           ("compile(reference)", tracked("compile", 0.6), False), ("fused", tracked("fused"), False)])
    monkeypatch.setenv(report.BUDGET_ENV, "0.5")
    report.run("cpu", True, ["fakerun"], str(tmp_path), reps=1)
    assert order == ["naive", "fused", "compile"]  # eager op cases, then compiled, the slow ones last
    data, _ = _report(tmp_path)
    assert [r["variant"] for r in data["results"]] == ["naive", "compile(reference)", "fused"]  # listing order
    assert [s["variant"] for s in data["run"]["skipped"]] == ["model"]


def test_sigterm_writes_the_report_then_exits(tmp_path, group):
    def terminate():
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends; the handler raises here
        return lambda: None

    before = signal.getsignal(signal.SIGTERM)
    group([("naive", _noop, False), ("fused", terminate, False), ("other", _noop, False)])
    with pytest.raises(SystemExit) as info:
        report.run("cpu", True, ["fakerun"], str(tmp_path), reps=1)
    assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    data, md = _report(tmp_path)
    assert [r["variant"] for r in data["results"]] == ["naive"]
    assert [s["variant"] for s in data["run"]["skipped"]] == ["fused", "other"]
    assert data["run"]["status"] == "interrupted by SIGTERM" and "interrupted by SIGTERM" in md


def test_commit_from_the_environment_or_unknown_without_git(monkeypatch):
    monkeypatch.setenv(report.COMMIT_ENV, "0123456789abcdef+dirty")
    assert report.environment("cpu")["commit"] == "0123456789abcdef+dirty"
    monkeypatch.delenv(report.COMMIT_ENV)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert report._git_commit() == "unknown"

    def other_repo(args, **kwargs):  # a copy without .git inside some other repository
        return subprocess.CompletedProcess(args, 0, stdout="/elsewhere\n", stderr="")

    monkeypatch.setattr(subprocess, "run", other_repo)
    assert report._git_commit() == "unknown"


def test_timeout_kills_a_real_run_and_the_report_is_there(tmp_path):
    """The path of run_gpu.sh's bench step: ``timeout`` sends SIGTERM to a run stuck in a case."""
    import shutil
    import sys

    if shutil.which("timeout") is None:
        pytest.skip("needs coreutils timeout")
    code = f"""
import time
from sdae_fast.bench import harness, report
harness.cases("cpu", True)
harness.copy_bandwidth_gbps = lambda device: 10.0
harness.matmul_tflops = lambda device: 0.1
def stuck():
    print("stuck", flush=True)
    time.sleep(60)
harness._GENERATORS["fakekill"] = lambda device, quick: [
    harness.Case("fakekill", "n=1", "naive", make=lambda: (lambda: None)),
    harness.Case("fakekill", "n=1", "fused", make=stuck)]
report.run("cpu", True, ["fakekill"], {str(tmp_path)!r}, reps=1)
"""
    env = dict(os.environ, SDAE_FAST_COMMIT="feedbeef", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["timeout", "-k", "10", "120", sys.executable, "-c", code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # SIGTERM once the run sits in the stuck case (what the limit does)
        if line.startswith("stuck"):
            os.kill(proc.pid, signal.SIGTERM)  # timeout passes it on to python
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM, rest
    data, md = _report(tmp_path)
    assert data["run"]["status"] == "interrupted by SIGTERM" and data["environment"]["commit"] == "feedbeef"
    assert [r["variant"] for r in data["results"]] == ["naive"]
    assert [s["variant"] for s in data["run"]["skipped"]] == ["fused"]


def test_cli_time_budget_reaches_the_run(tmp_path, group, monkeypatch):
    from sdae_fast.cli import build_parser

    def slow_make():
        time.sleep(0.6)
        return lambda: None

    group([("naive", slow_make, False), ("fused", _noop, False)])
    args = build_parser().parse_args(["bench", "--device", "cpu", "--ops", "fakerun", "--reps", "1",
                                      "--out", str(tmp_path), "--time-budget", "0.5"])
    assert args.func(args) == 0
    data, _ = _report(tmp_path)
    assert [s["variant"] for s in data["run"]["skipped"]] == ["fused"] and data["run"]["time_budget_s"] == 0.5
    bad = build_parser().parse_args(["bench", "--device", "cpu", "--time-budget", "0"])
    with pytest.raises(SystemExit, match="--time-budget must be > 0"):
        bad.func(bad)
