"""The loop's logging: no per-step host sync, NaN/inf stops at the exact step, tqdm bar, --quiet."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from test_pretrain import StandIn, _args, _one_thread, standin_build  # noqa: F401 (autouse fixture)

from sdae_fast.train.loop import pretrain


LOOP_FILES = ("train/loop.py", "train/progress.py")


def test_no_host_reads_of_device_scalars_between_log_intervals(tmp_path, monkeypatch):
    """``.item()``/``float()``/``int()`` of a tensor would sync every step: the loop's code never
    calls them; it reads the window with one ``tolist`` per --log-every (and per checkpoint)."""
    def guard(name):
        original = getattr(torch.Tensor, name)

        def checked(self, *a):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if caller.endswith(LOOP_FILES):
                raise AssertionError(f"Tensor.{name} in {caller}: a host sync on the step path")
            return original(self, *a)

        return checked

    reads = []
    tolist = torch.Tensor.tolist

    def counting_tolist(self):
        reads.append(self.numel())
        return tolist(self)

    for name in ("item", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    res = pretrain(_args(tmp_path, steps=20, log_every=5, clip_grad=1.0, workers=0), build_fn=standin_build)
    monkeypatch.undo()
    assert len(res["losses"]) == 20
    window_reads = [n for n in reads if n == 5 * 3]  # 5 steps x (loss, recon, grad_norm)
    assert len(window_reads) == 4
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(1, 21)) and [r["loss"] for r in lines] == res["losses"]
    assert all("grad_norm" in r and "recon" in r for r in lines)


class NanAt(StandIn):
    """The stand-in whose loss turns NaN at its ``bad``-th forward."""

    bad = 7

    def __init__(self, *a):
        super().__init__(*a)
        self.calls = 0

    def forward(self, images):
        out = super().forward(images)
        self.calls += 1
        if self.calls == self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match="loss is nan at step 7"):
        pretrain(_args(tmp_path, steps=20, log_every=5, workers=0), build_fn=lambda *a, **k: NanAt(16, 1))
    lines = open(tmp_path / "run" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 10  # the window holding the bad step is still logged


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_quiet_stays_quiet(tmp_path, monkeypatch, capsys):
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    pretrain(_args(tmp_path / "a", steps=12, log_every=4, quiet=False, workers=0), build_fn=standin_build)
    bar = term.getvalue()
    assert "12/12" in bar and "loss=" in bar and "img_s=" in bar and "<" in bar  # tqdm's elapsed<ETA
    assert "step      4/12" in capsys.readouterr().out
    quiet = FakeTerminal()
    monkeypatch.setattr("sys.stderr", quiet)
    pretrain(_args(tmp_path / "b", steps=12, log_every=4, quiet=True, workers=0), build_fn=standin_build)
    assert quiet.getvalue() == "" and capsys.readouterr().out == ""
