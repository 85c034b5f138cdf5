"""``sdae-fast bench``: run the cases, write a markdown table, the raw timings as JSON and a speed-up
bar chart (PNG, when matplotlib is installed)."""
from __future__ import annotations

import datetime
import importlib.util
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import time
from pathlib import Path

import torch

from . import harness


def environment(device: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, cuda=torch.version.cuda, sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env.update(cpu=platform.processor() or platform.machine())
    return env


COMMIT_ENV = "SDAE_FAST_COMMIT"  # the commit to record where the checkout has no .git (the lent GPU's copy)


def _git_commit() -> str:
    """``$SDAE_FAST_COMMIT`` when set (benchmarks/run_gpu.sh sets it), else ``git rev-parse HEAD`` of
    this package's own checkout (+dirty for uncommitted changes to tracked files), else "unknown"."""
    if os.environ.get(COMMIT_ENV, "").strip():
        return os.environ[COMMIT_ENV].strip()
    root = Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root)

    try:
        top = git("rev-parse", "--show-toplevel")
        # A copy without its .git may sit inside some other repository: that one's HEAD is not ours.
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return "unknown"
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def report_stem(out: Path, env: dict, only: list[str] | None) -> str:
    """A stem no report in ``out`` has yet, claimed by creating its ``.md``: ``<GPU>-<date>-<commit>``,
    then ``-ops-<g1+g2>`` for an ``--ops`` selection, then ``-2``, ``-3``, ... while taken, so runs on one
    day from one commit (other ``--ops``, or the same again) never overwrite each other."""
    base = f"{env.get('gpu', 'cpu').replace(' ', '_')}-{env['date'][:10]}-{env['commit'][:12]}"
    groups = [re.sub(r"[^A-Za-z0-9_.-]+", "_", o) for o in only or () if o]
    if groups:
        base += "-ops-" + "+".join(groups)
    for n in itertools.count(1):
        stem = base if n == 1 else f"{base}-{n}"
        if any((out / f"{stem}{ext}").exists() for ext in (".md", ".json", ".png")):
            continue
        try:
            (out / f"{stem}.md").open("x").close()
        except FileExistsError:  # a concurrent run took it first
            continue
        return stem


BUDGET_ENV = "SDAE_FAST_BENCH_BUDGET"  # seconds; what run() uses when no time_budget is given


class Terminated(SystemExit):
    """Raised by the SIGTERM handler of :func:`run` (``timeout`` sends SIGTERM): a ``SystemExit``,
    so no ``except Exception`` of a case swallows it, and ``finally`` still writes the report."""


def _on_sigterm(signum, frame):
    raise Terminated(128 + signum)


def _priority(case: harness.Case) -> int:
    """Run order under a time budget: the op cases first (eager variants, then torch.compile ones,
    whose compile takes seconds), the slow groups (compat, loader, training steps) last."""
    return 2 * case.slow + case.variant.startswith("compile")


def run(device: str, quick: bool, only: list[str] | None, out_dir: str | None, reps: int,
        time_budget: float | None = None) -> list[harness.Measurement]:
    """Measure the cases and write ``<stem>.md`` / ``.json`` into ``out_dir`` after every case (so a
    run killed part-way leaves the cases it finished), then the ``.png``. With ``time_budget``
    (seconds since the start; default: the ``SDAE_FAST_BENCH_BUDGET`` variable) no case starts once
    it has passed: the rest are listed as not run. A SIGTERM stops the run the same way (the report
    is written, then the process exits with 128 + 15)."""
    harness.check_groups(only)  # an unknown --ops entry fails before anything is measured or written
    if time_budget is None and os.environ.get(BUDGET_ENV):
        time_budget = float(os.environ[BUDGET_ENV])
    t0 = time.monotonic()
    previous = _install_sigterm()
    state = dict(status="running (killed before the end if this stays)", skipped=[], time_budget_s=time_budget)
    env, cases, done, stem, out = {}, [], {}, None, None
    try:
        env = environment(device)
        env["copy_gbps"] = harness.copy_bandwidth_gbps(device)
        env["matmul_tflops"] = harness.matmul_tflops(device)
        cases = harness.cases(device, quick, only)
        if out_dir:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = report_stem(out, env, only)
        for i in sorted(range(len(cases)), key=lambda i: (_priority(cases[i]), i)):
            if time_budget is not None and time.monotonic() - t0 >= time_budget:
                state["status"] = f"stopped: time budget of {time_budget:g} s reached"
                break
            m = done[i] = harness.measure(cases[i], device, reps=reps)
            status = m.error or f"{m.median_ms:.4f} ms"
            print(f"  {m.case.op:<32} {m.case.shape:<28} {m.case.variant:<22} {status}", flush=True)
            if out:
                _write(out, stem, env, _in_order(done), state, chart=False)
        else:
            state["status"] = "complete"
    except Terminated:
        state["status"] = "interrupted by SIGTERM"
        raise
    except Exception as exc:
        state["status"] = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        _restore_sigterm(previous)
        measurements = _in_order(done)
        state["skipped"] = [dict(op=c.op, shape=c.shape, variant=c.variant)
                            for i, c in enumerate(cases) if i not in done]
        state["wall_s"] = round(time.monotonic() - t0, 1)
        if out:
            written = _write(out, stem, env, measurements, state, chart=True)
            print(f"wrote {out / stem}{written}", flush=True)
    print(markdown(measurements, env, state))
    return measurements


def _in_order(done: dict) -> list:
    return [done[i] for i in sorted(done)]


_NOT_INSTALLED = object()


def _install_sigterm():
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: no handler, the per-case files still land
        return _NOT_INSTALLED


def _restore_sigterm(previous) -> None:
    if previous is not _NOT_INSTALLED:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _replace_text(path: Path, text: str) -> None:
    """Write then rename, so a reader (or a kill mid-write) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write(out: Path, stem: str, env: dict, measurements, state: dict, chart: bool) -> str:
    _replace_text(out / f"{stem}.md", markdown(measurements, env, state))
    raw = [dict(op=m.case.op, shape=m.case.shape, variant=m.case.variant, bytes=m.case.bytes, flops=m.case.flops,
                times_ms=m.times_ms, median_ms=m.median_ms if m.times_ms else None, peak_bytes=m.peak_bytes,
                error=m.error, note=m.case.note, compiled_graphs=m.graphs, graphs_while_timed=m.graphs_timed)
           for m in measurements]
    _replace_text(out / f"{stem}.json", json.dumps({"environment": env, "run": state, "results": raw}, indent=1))
    if chart and write_speedup_chart(measurements, env, out / f"{stem}.png"):
        return ".md, .json and .png"
    return ".md and .json"


def _naive_medians(measurements) -> dict:
    """``(op, shape) -> median ms`` of the naive variant, the baseline of every speed-up."""
    return {(m.case.op, m.case.shape): m.median_ms for m in measurements if m.case.variant == "naive" and m.times_ms}


def speedups(measurements) -> list[tuple[str, float]]:
    """``("op shape variant", naive median / variant median)`` for every measured non-naive case."""
    naive = _naive_medians(measurements)
    rows = []
    for m in measurements:
        base = naive.get((m.case.op, m.case.shape))
        if m.case.variant != "naive" and not m.error and m.times_ms and base:
            rows.append((f"{m.case.op} {m.case.shape} {m.case.variant}", base / m.median_ms))
    return rows


def write_speedup_chart(measurements, env, path) -> bool:
    """The speed-up bar chart beside the markdown; False (nothing written) without matplotlib or
    without any case that has a naive baseline."""
    rows = speedups(measurements)
    if not rows or importlib.util.find_spec("matplotlib") is None:
        return False
    from ..plots import speedup_chart

    speedup_chart([r[0] for r in rows], [r[1] for r in rows], str(path),
                  title=f"speed-up vs naive — {env.get('gpu', env.get('cpu'))}, {env['date'][:10]}")
    return True


def markdown(measurements, env, state: dict | None = None) -> str:
    """The report: environment, ceilings, how it timed, how the run ended (``state`` from
    :func:`run`), one row per measured case, the cases' notes and the cases not run."""
    copy_bw, mm = env.get("copy_gbps"), env.get("matmul_tflops")
    lines = [
        f"# sdae_fast benchmark — {env.get('gpu', env.get('cpu'))}",
        "",
        ", ".join(f"{k}: {env[k]}" for k in ("date", "torch", "triton", "cuda", "commit") if env.get(k)),
        f"Measured ceilings: copy {_fmt(copy_bw, '.0f')} GB/s (read + write), matmul {_fmt(mm, '.3g')} TFLOP/s.",
        _timing_line(env),
    ]
    if state is not None:
        skipped = len(state["skipped"])
        lines.append(f"Run: {state['status']}; {len(measurements)} cases measured, {skipped} not run"
                     + (" (listed at the end)" if skipped else "")
                     + (f"; {state['wall_s']} s" if state.get("wall_s") is not None else "") + ".")
    lines += [
        "",
        "| op | shape | variant | median ms | speed-up vs naive | GB/s | % copy BW | TFLOP/s | % matmul | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    naive = _naive_medians(measurements)
    for m in measurements:
        if m.error:
            lines.append(f"| {m.case.op} | {m.case.shape} | {m.case.variant} | error: {m.error[:80]} | | | | | | |")
            continue
        base = naive.get((m.case.op, m.case.shape))
        speedup = base / m.median_ms if base else None
        frac_bw = 100 * m.gbps / copy_bw if m.gbps and copy_bw else None
        frac_mm = 100 * m.tflops / mm if m.tflops and mm else None
        peak = m.peak_bytes / 2**20 if m.peak_bytes is not None else None
        lines.append(f"| {m.case.op} | {m.case.shape} | {m.case.variant} | {m.median_ms:.4f} | {_fmt(speedup, '.2f')} | "
                     f"{_fmt(m.gbps, '.0f')} | {_fmt(frac_bw, '.1f')} | {_fmt(m.tflops, '.3g')} | {_fmt(frac_mm, '.1f')} | "
                     f"{_fmt(peak, '.1f')} |")
    lines += _notes(measurements)
    skipped = (state or {}).get("skipped") or []
    if skipped:
        lines += ["", f"Not run ({state['status']}):", ""] + [f"- {c['op']} | {c['shape']} | {c['variant']}"
                                                               for c in skipped]
    return "\n".join(lines) + "\n"


def _timing_line(env) -> str:
    if env["device"] == "cuda":
        return (f"Timing: median over the timed calls, CUDA events around each call; before each timed call a "
                f"{harness.L2_FLUSH_BYTES >> 20} MB buffer is zeroed outside the events, so inputs start out of "
                f"L2 (not for the host-overhead cases); writes may still end in L2, so a small case can pass 100 % "
                f"of copy BW.")
    return "Timing: median over the timed calls, wall time around each synchronised call; no cache flush (CPU)."


def _notes(measurements) -> list[str]:
    """The cases' notes (units such as "median ms per 20 calls", what one call is, FLOP conventions),
    once per op and note, below the table."""
    seen = {}
    for m in measurements:
        if m.case.note:
            seen.setdefault((m.case.op, m.case.note), None)
    if not seen:
        return []
    return ["", "Notes:", ""] + [f"- {op}: {note}" for op, note in seen]
