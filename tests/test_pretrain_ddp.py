"""Two-process gloo DDP through ``torchrun``: every replica ends with bit-identical weights."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TESTS = os.path.dirname(os.path.abspath(__file__))

WORKER = textwrap.dedent("""
    import hashlib, os, sys
    import torch
    sys.path.insert(0, {tests!r})
    from sdae_fast.train.cli import make_args
    from sdae_fast.train.loop import pretrain
    from test_pretrain import standin_build

    method = sys.argv[1]
    build = standin_build if method == "standin" else None
    args = make_args(method="sdae" if build else method, img_size=16, batch_size=8, steps=int(sys.argv[2]),
                     lr=2e-3, out=sys.argv[3], ckpt_every=int(sys.argv[2]), knn=False, export=False,
                     quiet=True, device="cpu")
    res = pretrain(args, build_fn=build)
    h = hashlib.sha256()
    for name, t in sorted(res["model"].state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes() if torch.is_tensor(t) else repr(t).encode())
    rank = os.environ["RANK"]
    with open(os.path.join(sys.argv[3], f"digest{{rank}}.txt"), "w") as f:
        f.write(h.hexdigest() + " " + repr(res["losses"]))
""")


def _run_ddp(tmp_path, method, steps):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=TESTS))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), method, str(steps), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d0, d1 = [(out / f"digest{r}.txt").read_text().split(" ", 1) for r in (0, 1)]
    assert d0[0] == d1[0], "replicas diverged"
    assert d0[1] == d1[1], "ranks logged different (all-reduced) losses"
    assert os.path.exists(out / f"ckpt_{steps:08d}.pt")


def test_ddp_standin_replicas_identical(tmp_path):
    _run_ddp(tmp_path, "standin", 6)


@pytest.mark.parametrize("method", ["sdae", "dino"])  # mae, mixedae pass too (slower suite)
def test_ddp_real_model_replicas_identical(tmp_path, method):
    try:
        from sdae_fast.models import build  # noqa: F401
    except ImportError:
        pytest.skip("sdae_fast.models.build is not there yet")
    _run_ddp(tmp_path, method, 3)
