"""Training checkpoints: written atomically, loaded with clear errors, found by ``--resume auto``.

A checkpoint holds everything a resumed run needs to continue exactly as an uninterrupted one:
the model's state_dict (student, EMA teacher, centres, schedule counters), the optimizer, the step
(the lr schedule is a pure function of it), the sampler position (epoch, batch), every RNG state
(torch CPU, CUDA, python ``random``, numpy) and the command-line arguments.
"""
from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "batch", "rng", "args")


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"ckpt_{step:08d}.pt")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash mid-write
    leaves the previous checkpoint intact and never a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
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


def resolve_resume(resume: str, out_dir: str) -> str | None:
    """``auto`` is the latest checkpoint in ``out_dir`` (None when there is none: a fresh start)."""
    if resume != "auto":
        return resume
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def load_checkpoint(path: str) -> dict:
    """Load and sanity-check a checkpoint; missing or unreadable files raise errors naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a directory (use --resume auto to take the "
                                "latest checkpoint of --out)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, wrong file type...
        raise ValueError(f"checkpoint {path!r} is corrupt or not a sdae_fast checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks {', '.join(missing)}: not a sdae_fast pretrain checkpoint")
    return state
