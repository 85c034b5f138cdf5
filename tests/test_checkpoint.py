"""Checkpoints are plain data (weights_only loads), ``--resume auto`` survives a corrupt newest
checkpoint, and ``metrics.jsonl`` holds every step once after a resume.

The loop runs with the stand-in model of ``test_pretrain`` (fast); one test SIGKILLs a real
``sdae-fast pretrain`` process (MAE, micro) mid-run and resumes it.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sdae_fast.train import checkpoint as ckpt
from sdae_fast.train.cli import cmd_pretrain
from sdae_fast.train.loop import pretrain
from sdae_fast.train.metrics import MetricsWriter
from test_pretrain import _args, _params, standin_build


def _steps(metrics_path) -> list[int]:
    return [json.loads(line)["step"] for line in open(metrics_path)]


# --- item 1: plain data, weights_only ----------------------------------------------------------
def test_checkpoint_loads_with_weights_only_and_holds_no_callable(tmp_path):
    args = _args(tmp_path, steps=4, ckpt_every=2)
    args.func = cmd_pretrain  # as argparse's subcommand dispatch sets it
    pretrain(args, build_fn=standin_build)
    (_, path), = ckpt.list_checkpoints(str(tmp_path / "run"))[-1:]
    state = torch.load(path, map_location="cpu", weights_only=True)  # no UnpicklingError
    assert "func" not in state["args"] and state["args"]["steps"] == 4
    ckpt.check_plain(state)
    assert isinstance(state["rng"][0]["numpy"]["keys"], list)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    np.random.seed(7)
    random.seed(7)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (np.random.standard_normal(3).tolist(), random.random(), torch.rand(2))
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.standard_normal(3).tolist(), random.random(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_save_refuses_a_state_that_is_not_plain(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['args'\]\['func'\] is a builtins.function"):
        ckpt.save_checkpoint({"args": {"func": lambda: 0}}, str(tmp_path / "x.pt"))
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\] is a numpy.ndarray"):
        ckpt.save_checkpoint({"rng": np.zeros(3)}, str(tmp_path / "x.pt"))
    assert not (tmp_path / "x.pt").exists()
    assert ckpt.plain_args({"a": 1, "b": [1.0, "x", None], "f": print, "o": object()}) == {"a": 1, "b": [1.0, "x", None]}


class _RunsCode:
    """Unpickling this would create a folder: a stand-in for any code a malicious checkpoint runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("foreign", ["numpy", "code"])
def test_checkpoint_with_a_foreign_global_is_refused(tmp_path, foreign):
    marker = tmp_path / "ran"
    obj = np.random.get_state() if foreign == "numpy" else _RunsCode(str(marker))
    path = tmp_path / "ckpt_00000001.pt"
    torch.save({k: 0 for k in ckpt.REQUIRED_KEYS} | {"rng": obj}, path)
    global_name = "numpy" if foreign == "numpy" else "os.makedirs"
    with pytest.raises(ckpt.UnsafeCheckpointError, match=rf"ckpt_00000001.pt.*holds the global {global_name}.*"
                                                        r"weights_only=True"):
        ckpt.load_checkpoint(str(path))
    assert not marker.exists()
    with pytest.raises(ckpt.UnsafeCheckpointError):  # an explicit --resume keeps the error
        pretrain(_args(tmp_path, resume=str(path)), build_fn=standin_build)


# --- items 2 and 3: corrupt newest checkpoint, metrics without duplicates ---------------------
def _flip_in_largest_record(b: bytes) -> bytes:
    """One byte inverted in the middle of the largest record's data: torch.load alone loads that
    silently (it never checks the CRCs)."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(b)) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    start = info.header_offset  # local header: 30 bytes, then the name and the (local) extra field
    name_len = int.from_bytes(b[start + 26:start + 28], "little")
    extra_len = int.from_bytes(b[start + 28:start + 30], "little")
    at = start + 30 + name_len + extra_len + info.file_size // 2
    return b[:at] + bytes([b[at] ^ 0xFF]) + b[at + 1:]


CORRUPTIONS = {"half": lambda b: b[: len(b) // 2], "empty": lambda b: b"", "minus_100_bytes": lambda b: b[:-100],
               "flipped_byte": _flip_in_largest_record,
               "random_bytes": lambda b: bytes(torch.randint(0, 256, (len(b),), dtype=torch.uint8,
                                                             generator=torch.Generator().manual_seed(0)).tolist())}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_resume_auto_falls_back_past_a_corrupt_checkpoint(tmp_path, how):
    """Killed after step 10 (checkpoints at 4 and 8, steps 9-10 logged), newest checkpoint corrupt:
    auto resumes from step 4, warns naming the file, keeps it, and the run equals a straight one.
    Two loader workers stream the batches, so the metrics and the data both resume past the workers."""
    straight = pretrain(_args(tmp_path / "a", steps=12, workers=2), build_fn=standin_build)
    run = dict(steps=12, ckpt_every=4, keep_ckpts=0, workers=2)
    pretrain(_args(tmp_path / "b", stop_after=10, **run), build_fn=standin_build)
    out = tmp_path / "b" / "run"
    assert _steps(out / "metrics.jsonl") == list(range(1, 11))
    newest = out / "ckpt_00000008.pt"
    broken = CORRUPTIONS[how](newest.read_bytes())
    newest.write_bytes(broken)

    with pytest.raises(ValueError, match=r"ckpt_00000008.pt.*corrupt"):  # explicit: the clear error
        pretrain(_args(tmp_path / "b", resume=str(newest), **run), build_fn=standin_build)
    torch.manual_seed(12345)
    with pytest.warns(RuntimeWarning, match=r"unloadable checkpoint .*ckpt_00000008.pt"):
        resumed = pretrain(_args(tmp_path / "b", resume="auto", **run), build_fn=standin_build)

    assert resumed["losses"] == straight["losses"][4:]
    a, b = _params(straight["model"]), _params(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    kept = out / ("ckpt_00000008.pt" + ckpt.CORRUPT_SUFFIX)
    assert kept.read_bytes() == broken  # moved aside, never deleted nor overwritten
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [4, 8, 12]
    assert _steps(out / "metrics.jsonl") == list(range(1, 13))  # steps 5-10 once, not twice


def test_resume_auto_with_no_loadable_checkpoint_is_an_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt_00000004.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no checkpoint in .* loads"):
        pretrain(_args(tmp_path, resume="auto"), build_fn=standin_build)
    assert (out / "ckpt_00000004.pt.corrupt").read_bytes() == b"not a checkpoint"


def test_metrics_writer_drops_records_past_the_resume_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    writer = MetricsWriter(str(path), resume_step=5)  # the torn line of the kill goes too
    writer.write({"step": 6, "loss": 2.0})
    writer.close()
    assert _steps(path) == [1, 2, 3, 4, 5, 6]
    MetricsWriter(str(path)).close()  # a fresh run starts the file anew
    assert path.read_text() == ""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_then_corrupt_then_resume(tmp_path):
    """A real ``sdae-fast pretrain`` killed mid-run; its newest checkpoint then truncated by half."""
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "sdae_fast.cli", "pretrain", "--method", "mae", "--img-size", "16",
           "--batch-size", "8", "--steps", "40", "--ckpt-every", "4", "--keep-ckpts", "0", "--out", str(out),
           "--no-knn", "--no-export", "--quiet"]
    proc = subprocess.Popen(cli, env=os.environ | {"SDAE_FAST_BACKEND": "torch"})
    deadline = time.monotonic() + 300
    while not (out / "ckpt_00000012.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = ckpt.list_checkpoints(str(out))
    if found[-1][0] == 40:
        pytest.skip("the run finished before the kill landed")
    newest = pathlib.Path(found[-1][1])
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match=newest.name):
        pretrain(_args(tmp_path, method="mae", batch_size=8, steps=40, ckpt_every=4, keep_ckpts=0, resume="auto"))
    assert pathlib.Path(str(newest) + ckpt.CORRUPT_SUFFIX).exists()
    assert _steps(out / "metrics.jsonl") == list(range(1, 41))
