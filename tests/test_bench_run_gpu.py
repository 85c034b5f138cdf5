"""``benchmarks/run_gpu.sh`` without a GPU: python3, nvidia-smi and git are stubs, ``timeout`` is
real. What the device tool returns is bounded (8 files, 2 folders down), so the script must leave
few files in $OUT, and its step limits (+ 10 s grace each) must fit the ~8 minutes of one call."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"

PYTHON_STUB = r"""#!/usr/bin/env bash
echo "args: $*"
echo "env: commit=${SDAE_FAST_COMMIT:-unset} budget=${SDAE_FAST_BENCH_BUDGET:-unset}"
if [ "${2:-}" = sdae_fast.cli ] && [ "${3:-}" = bench ]; then
  while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
  for ext in md json png; do echo x > "$out/NVIDIA_H200-2026-01-01-abc.$ext"; done
fi
if [ "${2:-}" = sdae_fast.cli ] && [ "${3:-}" = pretrain ]; then
  while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
  mkdir -p "$out" && echo '{}' > "$out/metrics.jsonl" && echo '{}' > "$out/pretrain_info.json"
fi
"""


def _run(tmp_path, **env):
    if shutil.which("timeout") is None or shutil.which("tar") is None:
        pytest.skip("needs coreutils timeout and tar")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in {"python3": PYTHON_STUB, "nvidia-smi": "#!/bin/sh\necho H200\n",
                       "git": "#!/bin/sh\nexit 128\n"}.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    out = tmp_path / "out"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SDAE_FAST_", "BENCH_"))}
    full_env.update(PATH=f"{stubs}:{os.environ['PATH']}", OUT=str(out), TMPDIR=str(tmp_path), **env)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=repo, env=full_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def _logs(out):
    with tarfile.open(out / "logs.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_out_holds_few_files_and_the_logs_come_packed(tmp_path):
    out, stdout = _run(tmp_path, SDAE_FAST_COMMIT="0123abcd")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["NVIDIA_H200-2026-01-01-abc.json", "NVIDIA_H200-2026-01-01-abc.md",
                     "NVIDIA_H200-2026-01-01-abc.png", "logs.tar.gz", "steps.txt"]
    assert not [p for p in out.rglob("*") if p.is_dir()]
    logs = _logs(out)
    assert {"logs/install.log", "logs/bench.log", "logs/end_to_end.log", "pretrain/metrics.jsonl"} <= set(logs)
    bench = logs["logs/bench.log"]
    assert "commit=0123abcd budget=80" in bench and f"--out {out}" in bench and "--quick" in bench
    assert not list(tmp_path.glob("sdae_fast_gpu.*"))  # the work folder is removed
    steps = (out / "steps.txt").read_text()
    assert "commit: 0123abcd" in steps and "bench rc=0" in steps and "end-to-end rc=0" in steps


def test_commit_is_unknown_without_git_or_variable(tmp_path):
    out, _ = _run(tmp_path)
    assert "commit=unknown" in _logs(out)["logs/bench.log"]


def test_default_step_limits_with_grace_fit_450_s():
    text = SCRIPT.read_text()
    limits = []
    code = "\n".join(line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    for line in re.findall(r"(?:^|\s)step [\w-]+ (\S+) ", code, flags=re.M):
        default = re.fullmatch(r'"?\$\{?(\w+)(?::-(\d+))?\}?"?', line)
        if default:
            name, value = default.groups()
            value = value or re.search(rf"^{name}=\$\{{{name}:-(\d+)\}}", text, flags=re.M).group(1)
            limits.append(int(value))
        else:
            limits.append(int(line))
    assert len(limits) == 6, limits
    assert sum(limits) + 10 * len(limits) <= 450, limits
    assert "-k 10" in text
