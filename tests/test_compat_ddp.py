"""compat under DistributedDataParallel (gloo, two processes through torchrun): a MAE instance
patched before and one patched after DDP wrapping both give the unpatched DDP model's loss and
(all-reduced) gradients; compat DINOLoss all-reduces its centre."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORKER = textwrap.dedent("""
    import copy, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from sdae_fast.bench.official import OfficialMAE
    from sdae_fast.compat import mae as compat_mae
    from sdae_fast.compat.dino import DINOLoss
    from sdae_fast.testing import assert_close

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = OfficialMAE(norm_pix_loss=True)
    official = DDP(copy.deepcopy(base))
    before = DDP(compat_mae.patch(copy.deepcopy(base)))       # patched, then wrapped
    after = compat_mae.patch(DDP(copy.deepcopy(base)))        # wrapped, then patched
    assert compat_mae.patched_parts(after.module) and not compat_mae.patched_parts(official.module)
    torch.manual_seed(100 + rank)
    imgs = torch.randn(3, 3, 16, 16)

    def step(model):
        torch.manual_seed(7 + rank)
        loss, pred, mask = model(imgs)
        loss.backward()
        return loss.detach(), mask, {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}

    want = step(official)
    for name, model in (("before", before), ("after", after)):
        got = step(model)
        assert_close(got[0], want[0], name=name + " loss")
        assert torch.equal(got[1], want[1]), name + " mask"
        for key in want[2]:
            assert_close(got[2][key], want[2][key], reduction=48, name=name + " grad " + key)

    crit = DINOLoss(11, 4, 0.04, 0.04, 0, 1, backend="torch")
    teacher = torch.randn(4, 11) + rank
    crit(torch.randn(8, 11), teacher, 0)
    rows = [torch.empty_like(teacher) for _ in range(world)]
    dist.all_gather(rows, teacher)
    assert_close(crit.center[0], 0.1 * torch.cat(rows).mean(0), name="center")
    with open(os.path.join(sys.argv[1], "ok" + str(rank)), "w") as f:
        f.write("ok")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit)
    # The DDP wrappers hold the process group: free them first, so the group dies in
    # destroy_process_group and not during interpreter finalisation, where a gloo thread's last
    # tensor release can abort the process ("terminate called without an active exception").
    del official, before, after, model
    import gc
    gc.collect()
    dist.destroy_process_group()
""")


def test_compat_under_ddp(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
