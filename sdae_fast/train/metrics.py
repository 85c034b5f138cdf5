"""``metrics.jsonl``: one JSON record per logged step, written by rank 0."""
from __future__ import annotations

import json
import os

from .checkpoint import write_atomic


class MetricsWriter:
    """JSON lines, one per step, rank 0 only (``path=None`` writes nothing).

    A fresh run (``resume_step=None``) starts the file anew. A resumed run keeps the records up to
    and including ``resume_step``, the checkpoint's step, and **drops the records past it** before
    appending: the killed run logged steps after its last checkpoint, which the resumed run
    repeats, so without the drop those steps would appear twice. A line torn by the kill (not valid
    JSON) is dropped too. The file is rewritten atomically: a crash here loses nothing.
    """

    def __init__(self, path: str | None, resume_step: int | None = None):
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if resume_step is not None and os.path.exists(path):
                _truncate_after(path, resume_step)
            self.f = open(path, "a" if resume_step is not None else "w")

    def write(self, record: dict) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


def _truncate_after(path: str, step: int) -> None:
    """Rewrite ``path`` keeping the records whose ``step`` is at most ``step``."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, lambda f: f.writelines(line.encode() for line in kept))
