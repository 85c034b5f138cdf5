"""``sdae-fast bench``: run the cases, write a markdown table, the raw timings as JSON and a speed-up
bar chart (PNG, when matplotlib is installed)."""
from __future__ import annotations

import datetime
import importlib.util
import itertools
import json
import platform
import re
import subprocess
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


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
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


def run(device: str, quick: bool, only: list[str] | None, out_dir: str | None, reps: int) -> list[harness.Measurement]:
    harness.check_groups(only)  # an unknown --ops entry fails before anything is measured or written
    env = environment(device)
    env["copy_gbps"] = harness.copy_bandwidth_gbps(device)
    env["matmul_tflops"] = harness.matmul_tflops(device)
    measurements = []
    for case in harness.cases(device, quick, only):
        m = harness.measure(case, device, reps=reps)
        measurements.append(m)
        status = m.error or f"{m.median_ms:.4f} ms"
        print(f"  {case.op:<32} {case.shape:<28} {case.variant:<22} {status}", flush=True)
    table = markdown(measurements, env)
    print(table)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = report_stem(out, env, only)
        (out / f"{stem}.md").write_text(table)
        raw = [dict(op=m.case.op, shape=m.case.shape, variant=m.case.variant, bytes=m.case.bytes, flops=m.case.flops,
                    times_ms=m.times_ms, median_ms=m.median_ms if m.times_ms else None, peak_bytes=m.peak_bytes,
                    error=m.error, note=m.case.note, compiled_graphs=m.graphs, graphs_while_timed=m.graphs_timed)
               for m in measurements]
        (out / f"{stem}.json").write_text(json.dumps({"environment": env, "results": raw}, indent=1))
        written = ".md and .json"
        if write_speedup_chart(measurements, env, out / f"{stem}.png"):
            written = ".md, .json and .png"
        print(f"wrote {out / stem}{written}")
    return measurements


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


def markdown(measurements, env) -> str:
    lines = [
        f"# sdae_fast benchmark — {env.get('gpu', env.get('cpu'))}",
        "",
        ", ".join(f"{k}: {env[k]}" for k in ("date", "torch", "triton", "cuda", "commit") if env.get(k)),
        f"Measured ceilings: copy {env['copy_gbps']:.0f} GB/s (read + write), "
        f"matmul {env['matmul_tflops']:.3g} TFLOP/s.",
        _timing_line(env),
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
        frac_bw = 100 * m.gbps / env["copy_gbps"] if m.gbps else None
        frac_mm = 100 * m.tflops / env["matmul_tflops"] if m.tflops else None
        peak = m.peak_bytes / 2**20 if m.peak_bytes is not None else None
        lines.append(f"| {m.case.op} | {m.case.shape} | {m.case.variant} | {m.median_ms:.4f} | {_fmt(speedup, '.2f')} | "
                     f"{_fmt(m.gbps, '.0f')} | {_fmt(frac_bw, '.1f')} | {_fmt(m.tflops, '.3g')} | {_fmt(frac_mm, '.1f')} | "
                     f"{_fmt(peak, '.1f')} |")
    return "\n".join(lines + _notes(measurements)) + "\n"


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
