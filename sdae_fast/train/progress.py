"""Step logging without per-step host syncs, and the interactive progress bar.

:class:`StepWindow` keeps every step's scalars (the loss, the model's other 0-d outputs, the
gradient norm) as device tensors and reads them all at once when the log interval ends: one
all-reduce and one device->host copy per ``--log-every`` steps instead of one ``.item()`` per step.
The per-step values still reach the JSON-lines log, and a NaN/inf loss still stops the run with
the exact step that produced it (found when its window is read).

:class:`Progress` is a tqdm bar (step / total, loss, images/s, ETA) on interactive runs only: rank
0, not ``--quiet``, stderr a terminal. Log lines go through ``tqdm.write`` so they print above it.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from .distributed import mean_across_ranks


class StepWindow:
    def __init__(self):
        self.rows: list[dict] = []  # host fields of each step
        self.values: list[torch.Tensor] = []  # device scalars, flattened in the order of ``layout``
        self.layout: list[tuple[int, str]] = []
        self.t_start = time.perf_counter()

    def add(self, record: dict, out: dict, grad_norm=None) -> None:
        """``record``: host fields (step, epoch, lr); ``out``: the model's output dict."""
        row = len(self.rows)
        self.rows.append(dict(record))
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        if grad_norm is not None:
            tensors["grad_norm"] = grad_norm
        for key, value in tensors.items():
            self.layout.append((row, key))
            self.values.append(value.detach().float().reshape(()))
        for key, value in out.items():
            if isinstance(value, (int, float)) and key not in tensors:
                self.rows[row][key] = float(value)

    def __len__(self) -> int:
        return len(self.rows)

    def flush(self, info, images_per_step: int) -> list[dict]:
        """The window's records as host values (one sync), averaged across ranks; raises
        ``FloatingPointError`` at the first step whose loss is not finite."""
        if not self.rows:
            return []
        values = mean_across_ranks(torch.stack(self.values), info).tolist() if self.values else []
        for (row, key), value in zip(self.layout, values):
            self.rows[row][key] = value
        elapsed = max(time.perf_counter() - self.t_start, 1e-9)
        rate = len(self.rows) * images_per_step / elapsed
        records = [r | {"images_per_s": rate} for r in self.rows]
        self.rows, self.values, self.layout, self.t_start = [], [], [], time.perf_counter()
        return records


def first_nonfinite(records: list[dict]):
    """The first record whose loss is NaN or infinite, or None."""
    return next((r for r in records if not math.isfinite(r["loss"])), None)


class Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, loss: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
