"""Value checks without host syncs: deferred (the default) or eager.

Shape, dtype, device and contiguity checks are free (the host knows them) and always run at the
call. A *value* check (an index in range, a mask that selects something, non-negative labels)
needs the data, and reading data on the host stops the GPU. So by default it is deferred:

* the op computes the condition on the device and, when it fails, records the op, the argument
  and the offending values in a small per-device int64 table (``torch.where`` into the row of that
  check: no sync, capturable by CUDA graphs, traceable by ``torch.compile``);
* the kernels never trust the value meanwhile: bad indices are skipped (their rows read zeros, their
  gradients go nowhere), so a bad value is never an illegal memory access;
* the table is read where the host waits anyway: :func:`check_errors` (the training loop calls it
  at its log interval and before checkpoints), which raises the first failed check with the same
  exception type and message the eager mode raises at the call, then clears the table.

``SDAE_FAST_CHECKS=eager`` (read at every eager call; a ``torch.compile`` graph keeps the mode
it was traced with) or :func:`set_checks` ``("eager")`` raise at the call instead, at the cost of
one sync per check: for debugging, in eager code (the sync would break a compiled graph). Wrong results between a failed
check and :func:`check_errors` are therefore never silent: the next read of the table raises.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import torch

from .dispatch import triton_installed

ENV_VAR = "SDAE_FAST_CHECKS"
MODES = ("deferred", "eager")
_override: str | None = None


def set_checks(mode: str | None) -> None:
    """Force ``"deferred"`` or ``"eager"`` checks in this process; ``None`` goes back to the env var."""
    global _override
    if mode is not None and mode not in MODES:
        raise ValueError(f"checks mode must be one of {MODES} or None, got {mode!r}")
    _override = mode


def checks_mode() -> str:
    mode = _override or os.environ.get(ENV_VAR) or "deferred"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: choose one of {', '.join(MODES)}")
    return mode


@dataclass(frozen=True)
class Check:
    """One value check of one op: its slot in the table, the exception type and the message.

    ``message`` is formatted with ``v0, v1, v2``, the three int64 values the check recorded, and
    ``f0``: ``v0`` read back as a float64 (a float argument recorded with :func:`float_bits`).
    """

    slot: int
    op: str
    error: type
    message: str

    def exception(self, v0: int, v1: int, v2: int) -> Exception:
        f0 = struct.unpack("<d", struct.pack("<q", v0))[0]
        return self.error(f"{self.op}: " + self.message.format(v0=v0, v1=v1, v2=v2, f0=f0))


def float_bits(value: torch.Tensor) -> torch.Tensor:
    """A 0-dim floating tensor as the int64 bit pattern of its float64 value, so that the int64
    table of checks can record it (a message names it as ``{f0}``). Device ops only: no sync."""
    return value.detach().to(torch.float64).reshape(()).view(torch.int64)


CHECKS: dict[tuple, Check] = {}
# device -> (1 + slots, 5) int64. Row 0: [failures recorded so far, ...]; row 1 + slot: [failed, v0,
# v1, v2, order of the failure], so check_errors() can name the earliest one.
_TABLES: dict[str, torch.Tensor] = {}
_SLOTS = 32  # room for every check of every op, so a table is allocated once per device


def register(op: str, error: type, message: str) -> Check:
    """The check of ``op`` with this message (created once; ops call this at import time)."""
    key = (op, error, message)
    if key not in CHECKS:
        if len(CHECKS) >= _SLOTS:
            raise RuntimeError(f"more than {_SLOTS} value checks: raise sdae_fast.checks._SLOTS")
        CHECKS[key] = Check(len(CHECKS), op, error, message)
    return CHECKS[key]


def prepare(device) -> None:
    """Allocate ``device``'s table of checks now. Call it before torch.compile traces a step (TrainStep
    and ``pretrain --compile`` do): made inside a trace, the table is new to the first graph's
    guards, so that graph never runs again (one more compile). A bare ``"cuda"`` means the current
    device, the table its tensors' ops record into (``cuda:0``, not a table of its own)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _table(device)


def _table(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _TABLES:
        # A normal tensor even when the first op runs under inference_mode: an inference tensor
        # could not be updated in place outside it, so every later op would fail.
        with torch.inference_mode(False):
            _TABLES[key] = torch.zeros(1 + _SLOTS, 5, dtype=torch.int64, device=device)
    return _TABLES[key]


def fail_if(check: Check, failed: torch.Tensor, v0, v1=0, v2=0) -> None:
    """Record (deferred) or raise (eager) ``check`` where the 0-dim bool ``failed`` is true.

    ``v0..v2``: 0-dim tensors or ints, the values the message names. The first failure since the
    last :func:`check_errors` is kept.
    """
    if failed.is_meta:
        return  # a meta tensor has no values to check (shape inference)
    if checks_mode() == "eager":
        if bool(failed):  # the one sync eager mode pays
            raise check.exception(*(int(v) for v in (v0, v1, v2)))
        return
    device = failed.device
    table = _table(device)
    row, count = table[1 + check.slot], table[0, :1]
    failed = failed.to(torch.int64).reshape(1)
    # torch.full, never torch.tensor(value, device=...): a blocking host->device copy syncs the stream.
    values = torch.cat([failed] + [v.to(torch.int64).reshape(1) if isinstance(v, torch.Tensor)
                                   else torch.full((1,), int(v), dtype=torch.int64, device=device)
                                   for v in (v0, v1, v2)] + [count])
    row.copy_(torch.where(row[0] == 0, values, row))  # a failure already recorded is kept
    count.add_(failed)


def index_in_range(check: Check, index: torch.Tensor, upper: int) -> None:
    """Every value of ``index`` lies in [0, upper); the message gets the index's range and ``upper``.

    Deferred on a 2-d CUDA tensor: one Triton launch (``sdae_fast.kernels.value_checks``) instead
    of the ~10 tiny launches of the torch ops below (so for :func:`not_negative`, :func:`not_all_zero`)."""
    if index.numel() == 0 or index.is_meta:
        return
    if _one_launch(index):
        _launch_check(check, index, 0, upper, all_zero=False)
        return
    lo, hi = torch.aminmax(index)
    fail_if(check, (lo < 0) | (hi >= upper), lo, hi, upper)


def not_negative(check: Check, values: torch.Tensor) -> None:
    """Every value of the integer ``values`` is >= 0; the message gets the lowest as ``v0``."""
    if values.numel() == 0 or values.is_meta:
        return
    if _one_launch(values):
        _launch_check(check, values, 0, 2**62, all_zero=False)
        return
    lowest = values.min()
    fail_if(check, lowest < 0, lowest)


def not_all_zero(check: Check, values: torch.Tensor) -> None:
    """Some value of ``values`` is non-zero (a mask selects something)."""
    if values.is_meta:
        return
    if _one_launch(values):
        _launch_check(check, values, 0, 0, all_zero=True)
        return
    fail_if(check, values.any().logical_not(), 0)  # logical_not: any() of uint8 is uint8


def _one_launch(t: torch.Tensor) -> bool:
    """Deferred checks of 2-d CUDA tensors take one Triton launch (sdae_fast.kernels.value_checks)."""
    return t.is_cuda and t.dim() == 2 and checks_mode() == "deferred" and triton_installed()


def _launch_check(check: Check, t: torch.Tensor, lower: int, upper: int, all_zero: bool) -> None:
    from .kernels import value_checks  # noqa: F401  (registers the kernel op)

    torch.ops.sdae_fast.check_values_triton(t, _table(t.device), lower, upper, 1 + check.slot, all_zero)


def pending() -> list[Exception]:
    """Every failed check recorded on any device (one device->host copy per device), without clearing."""
    by_slot = {c.slot: c for c in CHECKS.values()}
    found = []
    for table in _TABLES.values():
        rows = table[1:].cpu().tolist()
        found += [(row[4], by_slot[i].exception(*row[1:4])) for i, row in enumerate(rows) if row[0]]
    return [e for _, e in sorted(found, key=lambda item: item[0])]


def clear() -> None:
    for table in _TABLES.values():
        table.zero_()


def check_errors() -> None:
    """Raise the earliest value check that failed since the last call (deferred mode), and clear them.

    The exception has the type and message the eager mode raises at the call (IndexError for an
    index out of range, ValueError otherwise), naming the op, the argument and the values.
    Costs one small device->host copy per device that ran a check: call it where the host waits
    anyway (a log interval, a checkpoint, the end of a test).
    """
    found = pending()
    if not found:
        return
    clear()
    first = found[0]
    if len(found) > 1:
        more = "; ".join(str(e) for e in found[1:])
        first = type(first)(f"{first} (also failed: {more})")
    raise first
