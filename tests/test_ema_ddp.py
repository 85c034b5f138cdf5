"""Two gloo processes: after N DDP steps the EMA teachers are identical on both ranks and equal the
reference update of the (synchronised) student."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from sdae_fast import reference
        from sdae_fast.ema_teacher import EmaTeacher

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EmaTeacher(ddp, total_steps=STEPS, backend=backend)
        shadow = [t.clone() for t in ema._teacher_params]
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(STEPS):
            torch.manual_seed(100 * step + rank)  # different data on each rank
            opt.zero_grad()
            ddp(torch.randn(4, 5)).square().mean().backward()
            opt.step()
            reference.ema_update_(shadow, [p.detach() for p in model.parameters()], ema.momentum())
            ema.update()
        flat = torch.cat([t.reshape(-1) for t in ema._teacher_params])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        ok_ranks = all(torch.equal(g, gathered[0]) for g in gathered)
        ok_ref = all(torch.equal(t, s) for t, s in zip(ema._teacher_params, shadow))
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
            f.write(f"{ok_ranks} {ok_ref}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddp_teachers_identical_and_equal_reference(backend, tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), backend, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        assert (tmp_path / f"rank{rank}").read_text() == "True True", f"rank {rank}"
