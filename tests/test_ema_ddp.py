"""EmaTeacher under torch.distributed on CPU (gloo, 2 processes): a DistributedDataParallel student
(the teacher pairs the underlying module) and FSDP2 local shards. After N steps the teacher is
identical on both ranks and equal to a single-process reference that averages the two ranks'
gradients as DDP does."""
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sdae_fast.ema_teacher import EmaTeacher

WORLD, STEPS = 2, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.decoder = nn.Linear(8, 8)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=g)


def loss_of(model, x):
    return (model(x) ** 2).mean()


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def ema_kwargs():
    return dict(base_momentum=0.9, final_momentum=0.99, total_steps=STEPS, exclude=("decoder*",))


def single_process_reference():
    student = make()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    ema = EmaTeacher(student, **ema_kwargs())
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD):
            student.zero_grad()
            loss_of(student, batch(step, rank)).backward()
            grads.append([p.grad.clone() for p in student.parameters()])
        for p, *gs in zip(student.parameters(), *grads):
            p.grad = sum(g / WORLD for g in gs)
        opt.step()
        ema.update()
    return {k: v.clone() for k, v in ema.teacher.state_dict().items()}


def _worker(rank, mode, init_file, out_dir, backend):
    try:
        if backend == "triton":
            os.environ["TRITON_INTERPRET"] = "1"
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        student = make()
        if mode == "ddp":
            teacher = None
            student_wrapped = nn.parallel.DistributedDataParallel(student)
        else:
            from torch.distributed.fsdp import fully_shard

            teacher = make()
            for m in (student, teacher):
                fully_shard(m.encoder[0])
                fully_shard(m.encoder[2])
                fully_shard(m)
            student_wrapped = student
        opt = torch.optim.SGD(student_wrapped.parameters(), lr=0.1)
        ema = EmaTeacher(student_wrapped, teacher=teacher, backend=backend, **ema_kwargs())
        for step in range(STEPS):
            opt.zero_grad()
            loss_of(student_wrapped, batch(step, rank)).backward()
            opt.step()
            ema.update()
        state = ema.teacher.state_dict()
        if mode == "fsdp2":
            state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
        torch.save({k: v.detach().clone() for k, v in state.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run(mode, tmp_path, backend="torch", timeout_s=240):
    ctx = mp.spawn(_worker, args=(mode, str(tmp_path / "init"), str(tmp_path), backend), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        # join() returns False each time one worker ends while another still runs: loop, bounded.
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise AssertionError(f"{mode} workers did not finish within {timeout_s} s")
    except mp.ProcessRaisedException:
        errors = [p.read_text() for p in tmp_path.glob("error*.txt")]
        raise AssertionError("\n".join(errors) or "worker failed")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddp_teacher_identical_across_ranks_and_to_reference(tmp_path, backend):
    states = _run("ddp", tmp_path, backend)
    expected = single_process_reference()
    for name in expected:
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], expected[name], rtol=1e-6, atol=1e-7)


def test_fsdp2_local_shards(tmp_path):
    """FSDP2 (fully_shard) on CPU/gloo: teacher sharded like the student, updated shard by shard."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    states = _run("fsdp2", tmp_path)
    expected = single_process_reference()
    for name in expected:
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], expected[name], rtol=1e-6, atol=1e-7)
