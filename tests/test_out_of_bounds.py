"""Every fused op, forward and backward, with each input and launcher output against an
inaccessible page (tests/guard_pages.py): a kernel that reads or writes past a tensor's end or
before its start faults in the interpreter here, as it would be an illegal address on the GPU."""
import os
import subprocess
import sys

import pytest

GUARD = os.path.join(os.path.dirname(__file__), "guard_pages.py")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages use Linux mmap + mprotect")
@pytest.mark.parametrize("side", ["end", "start"])
def test_no_access_outside_any_tensor(side):
    run = subprocess.run([sys.executable, GUARD, side], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and run.stdout.rstrip().endswith("all ok"), (
        f"guard_pages.py {side} exited {run.returncode} (a fault is -11); the last op it started and the "
        f"kernel line:\n{run.stdout[-600:]}\n{run.stderr[-3000:]}")
