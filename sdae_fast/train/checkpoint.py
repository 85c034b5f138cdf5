"""Training checkpoints: plain data only, written atomically, loaded with ``weights_only=True``,
found by ``--resume auto`` past a corrupt one.

A checkpoint holds everything a resumed run needs to continue exactly as an uninterrupted one:
the model's state_dict (student, EMA teacher, centres, schedule counters), the optimizer, the step
(the lr schedule is a pure function of it), the sampler position (epoch, batch), every RNG state
(torch CPU, CUDA, python ``random``, numpy) and the command-line arguments.

Only tensors and plain Python values (None, bool, int, float, str, and lists, tuples and dicts of
them) go in: numpy's RNG state as ints and lists, the arguments without callables. So every
checkpoint loads with ``torch.load(..., weights_only=True)``, which runs no code from the file, and
a file holding any other Python object is refused with :class:`UnsafeCheckpointError`.
"""
from __future__ import annotations

import glob
import os
import random
import re
import warnings
import zipfile

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "batch", "rng", "args")
CORRUPT_SUFFIX = ".corrupt"  # an unloadable checkpoint moved aside by ``--resume auto``, never deleted
PLAIN_TYPES = (type(None), bool, int, float, str, torch.Tensor, torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A checkpoint file is missing its keys, truncated, or otherwise not loadable."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds Python objects other than tensors and plain values (loading would run code)."""


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"ckpt_{step:08d}.pt")


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (numpy's legacy MT19937 tuple as a dict of ints)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"bit_generator": str(name), "keys": [int(k) for k in keys], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a loaded tuple may come back as a list
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_args(args) -> dict:
    """The arguments (a Namespace or dict) that are plain values; callables such as argparse's
    ``func`` and any other object are left out, so the checkpoint stays weights_only-loadable."""
    items = vars(args) if not isinstance(args, dict) else args
    out = {}
    for key, value in items.items():
        try:
            check_plain(value, key)
        except TypeError:
            continue
        out[key] = value
    return out


def check_plain(obj, where: str = "checkpoint") -> None:
    """``obj`` is tensors and plain values all the way down; else a TypeError naming the entry."""
    if isinstance(obj, PLAIN_TYPES):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}: only str and int keys are plain")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds only "
                    "tensors and plain Python values, so that it loads with weights_only=True")


def save_checkpoint(state: dict, path: str) -> None:
    """Check that ``state`` is plain (see :func:`check_plain`), then :func:`save_atomic` it."""
    check_plain(state)
    save_atomic(state, path)


def save_atomic(obj, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path: str, write) -> None:
    """``write(f)`` into a temporary file in the same folder, fsync, then os.replace: a crash mid-write
    leaves the previous file intact and never a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in ``out_dir``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "ckpt_*.pt")):
        m = CKPT_PATTERN.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def prune_checkpoints(out_dir: str, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(out_dir)[:-keep]:
        os.remove(path)


SUPERSEDED_SUFFIX = ".superseded"  # a checkpoint past the step a run restarted from, set aside, never deleted


def set_aside_later(out_dir: str, step: int) -> list[str]:
    """Move the checkpoints of ``out_dir`` past ``step`` aside (``<name>.superseded``): a run that
    restarts there (fresh, or resumed from an older checkpoint) writes its own history from ``step``
    on, as its metrics file does, so neither ``--resume auto`` nor pruning may take the old ones
    for its newest. Returns the new paths."""
    moved = []
    for s, path in list_checkpoints(out_dir):
        if s > step:
            os.replace(path, path + SUPERSEDED_SUFFIX)
            moved.append(path + SUPERSEDED_SUFFIX)
    return moved


def resolve_resume(resume: str, out_dir: str) -> str | None:
    """``auto`` is the latest checkpoint in ``out_dir`` (None when there is none: a fresh start),
    without loading it; :func:`resume_checkpoint` is what the loop uses."""
    if resume != "auto":
        return resume
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def resume_checkpoint(resume: str | None, out_dir: str) -> tuple[str | None, dict | None]:
    """``(path, state)`` to resume from, or ``(None, None)`` for a fresh start.

    An explicit path must load (else the clear error of :func:`load_checkpoint`). ``auto`` takes the
    newest checkpoint of ``out_dir`` that loads: each newer one that does not (truncated by a crash
    or a full disk, not a checkpoint, unsafe) is warned about by name and moved aside to
    ``<name>.corrupt``, never deleted, so that neither a later save at its step nor pruning can
    overwrite it. When checkpoints exist but none loads, that is an error, not a fresh start.
    """
    if not resume:
        return None, None
    if resume != "auto":
        return resume, load_checkpoint(resume)
    found = list_checkpoints(out_dir)
    failures = []
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            kept = _move_aside(path)
            failures.append(f"{path}: {exc}")
            warnings.warn(f"--resume auto: skipping the unloadable checkpoint {path!r} (kept as {kept!r}): {exc}",
                          RuntimeWarning, stacklevel=2)
    if failures:
        raise CheckpointError(f"--resume auto: no checkpoint in {out_dir!r} loads:\n  " + "\n  ".join(failures))
    return None, None


def _move_aside(path: str) -> str:
    """Rename ``path`` to a free ``<path>.corrupt[.N]``; returns the new name (the old one when another
    process of the same launch moved it first)."""
    target, n = path + CORRUPT_SUFFIX, 0
    while os.path.exists(target):
        n += 1
        target = f"{path}{CORRUPT_SUFFIX}.{n}"
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return path
    return target


def load_checkpoint(path: str) -> dict:
    """Load (``weights_only=True``) and sanity-check a checkpoint; errors name the file and the cause."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a directory (use --resume auto to take the "
                                "latest checkpoint of --out)")
    if not zipfile.is_zipfile(path):  # torch.save's archive: anything else is damaged or another file
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a sdae_fast checkpoint (not a zip archive)")
    damaged = _record_failing_crc(path)
    if damaged:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its record {damaged!r} fails the CRC-32 torch.save "
                              f"wrote (its bytes changed since)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, wrong file type, a foreign global...
        if "Weights only load failed" in str(exc):
            found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(exc))
            what = f"the global {found.group(1)}" if found else "objects other than tensors and plain values"
            raise UnsafeCheckpointError(
                f"checkpoint {path!r} holds {what}, which sdae_fast refuses to unpickle: it loads checkpoints "
                f"with weights_only=True and runs no code from a file. The file was written by another program "
                f"or an older sdae_fast; only if you trust it, load it with torch.load(..., weights_only=False) "
                f"and re-save its contents as tensors and plain values.") from exc
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a sdae_fast checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {', '.join(missing)}: not a sdae_fast pretrain checkpoint")
    return state


def _record_failing_crc(path: str) -> str | None:
    """The first record of the archive whose bytes fail its CRC-32, or None. torch.save writes the
    CRCs but torch.load never checks them, so a flipped bit would load as a silently wrong weight.
    Records written without a CRC (0, torch's ``compute_crc32=False``) are not checked. One read of
    the file, at resume only."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:
                    continue
                try:
                    with archive.open(info) as record:
                        while record.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    except (zipfile.BadZipFile, OSError, EOFError):
        return None  # a damaged directory: torch.load names the cause
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
