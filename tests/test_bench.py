"""``sdae-fast bench`` reports (``sdae_fast.bench.report``): one set of files per run, never
overwritten; an ``--ops`` entry that names no case group is an error listing the groups. The cases
here are registered stand-ins and the ceilings are stubbed, so nothing heavy is timed."""
from __future__ import annotations

import json

import pytest

from sdae_fast.bench import harness, report
from test_pretrain import _one_thread  # noqa: F401  (autouse: one torch thread on the shared CPU)


@pytest.fixture
def fake_groups(monkeypatch):
    """Two tiny case groups, ``fakegroup_a`` and ``fakegroup_b``, and fixed ceilings (no 64 MiB copy
    or 1024² matmul timed per run)."""
    harness.cases("cpu", True)  # import the real case modules first, so the registry is complete
    for name in ("fakegroup_a", "fakegroup_b"):
        def gen(device, quick, name=name):
            return [harness.Case(name, "n=1", variant, make=lambda: (lambda: None)) for variant in ("naive", "fused")]

        monkeypatch.setitem(harness._GENERATORS, name, gen)
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda device: 10.0)
    monkeypatch.setattr(harness, "matmul_tflops", lambda device: 0.1)


def _ops_of(path):
    return sorted({r["op"] for r in json.loads(path.read_text())["results"]})


def test_reports_of_runs_in_one_folder_never_overwrite_each_other(tmp_path, fake_groups):
    report.run("cpu", True, ["fakegroup_a"], str(tmp_path), reps=1)
    report.run("cpu", True, ["fakegroup_b"], str(tmp_path), reps=1)
    report.run("cpu", True, ["fakegroup_a"], str(tmp_path), reps=1)  # same groups again: still a new file
    reports = sorted(tmp_path.glob("*.json"))
    assert len(reports) == 3, [p.name for p in reports]
    assert sorted(_ops_of(p)[0] for p in reports) == ["fakegroup_a", "fakegroup_a", "fakegroup_b"]
    for p in reports:  # each run's .md (and .png) beside its .json, under the same stem
        assert p.with_suffix(".md").exists()
        assert _ops_of(p)[0] in p.with_suffix(".md").read_text()
    # The name still starts <device>-<date>-<commit> (benchmarks/results/README.md) and says the groups.
    env = report.environment("cpu")
    prefix = f"cpu-{env['date'][:10]}-{env['commit'][:12]}"
    assert all(p.name.startswith(prefix) for p in reports)
    assert sum("fakegroup_b" in p.name for p in reports) == 1


def test_unknown_op_group_is_an_error_listing_the_groups(tmp_path, fake_groups):
    with pytest.raises(ValueError, match=r"nosuchop.*known groups:.*\bema\b.*fakegroup_a"):
        report.run("cpu", True, ["nosuchop"], str(tmp_path), reps=1)
    with pytest.raises(ValueError, match=r"'nosuchop'") as info:  # one bad entry among good ones
        harness.cases("cpu", True, ["fakegroup_a", "nosuchop"])
    assert "'fakegroup_a'" not in str(info.value).split("known groups")[0]
    assert not list(tmp_path.iterdir())  # no empty report written
    assert "topk_attention" in harness.group_names() and "fakegroup_b" in harness.group_names()
    assert [c.op for c in harness.cases("cpu", True, ["fakegroup_b"])] == ["fakegroup_b"] * 2


def test_bench_cli_unknown_op_group(tmp_path, fake_groups):
    from sdae_fast.cli import main

    with pytest.raises(ValueError, match="unknown op group 'nosuchop'"):
        main(["bench", "--device", "cpu", "--ops", "nosuchop", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_markdown_shows_the_case_notes(tmp_path, fake_groups, monkeypatch):
    def gen(device, quick):
        return [harness.Case("noted op", "n=1", "naive", make=lambda: (lambda: None), note="median ms per 20 calls")]

    monkeypatch.setitem(harness._GENERATORS, "fakegroup_noted", gen)
    report.run("cpu", True, ["fakegroup_noted"], str(tmp_path), reps=1)
    md = next(tmp_path.glob("*.md")).read_text()
    assert "- noted op: median ms per 20 calls" in md


def test_markdown_says_how_it_timed():
    env = dict(date="2026-01-01T00:00:00", device="cuda", gpu="X", commit="abc", copy_gbps=1.0, matmul_tflops=1.0)
    assert "256 MB buffer is zeroed" in report.markdown([], env)
    assert "no cache flush" in report.markdown([], dict(env, device="cpu", cpu="x86_64"))


def test_speedup_bars_start_at_1x_on_the_log_axis(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from sdae_fast import plots

    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, plt, path: (figures.append(fig), real_save(fig, plt, path))[1])
    plots.speedup_chart(["a", "b", "c"], [0.5, 2.0, 40.0], str(tmp_path / "s.png"), title="t")
    ax = figures[0].axes[0]
    spans = sorted((min(p.get_x(), p.get_x() + p.get_width()), max(p.get_x(), p.get_x() + p.get_width()))
                   for p in ax.patches)
    assert spans == [(0.5, 1.0), (1.0, 2.0), (1.0, 40.0)]  # each bar from 1x to its speed-up
    lo, hi = ax.get_xlim()
    assert lo < 0.5 and hi > 40.0 and ax.get_xscale() == "log"
    assert "×" in ax.get_xlabel() or "x" in ax.get_xlabel()
    assert (tmp_path / "s.png").stat().st_size > 0
