"""dino_loss's centre update across processes (SPEC §4): two gloo ranks with different teacher
batches end with the same centre, the one the concatenated batch gives in a single process."""
import multiprocessing
import os
import socket

import pytest
import torch

from sdae_fast.reference import update_center_
from sdae_fast.testing import assert_close

WORLD, VIEWS, GLOBAL, BATCH, WIDTH = 2, 3, 2, 2, 130
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)  # a different teacher batch per rank
    student = torch.randn(VIEWS * BATCH, WIDTH, generator=g)
    teacher = torch.randn(GLOBAL * BATCH, WIDTH, generator=g) * 2 + rank
    return student, teacher


def _initial_center():
    return torch.randn(WIDTH, generator=torch.Generator().manual_seed(7))


def _worker(rank, port, backend, out_dir):
    # Spawned: set the interpreter and poisoning up before sdae_fast / triton are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["SDAE_FAST_POISON"] = "1"
    from datetime import timedelta

    import torch.distributed as dist

    import sdae_fast

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        student, teacher = _rank_inputs(rank)
        center = _initial_center()
        student.requires_grad_()
        loss = sdae_fast.dino_loss(student, teacher, center, num_global=GLOBAL, center_momentum=0.8,
                                   update_center=True, backend=backend)
        loss.backward()
        torch.save({"center": center, "loss": loss.detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit)
    finally:
        dist.destroy_process_group()


def _run_ranks(backend, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, backend, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    stuck = [p for p in procs if p.is_alive()]
    for p in stuck:
        p.terminate()
        p.join(5)
    assert not stuck, f"{len(stuck)} rank(s) did not finish within {TIMEOUT_S}s"
    assert all(p.exitcode == 0 for p in procs), f"rank exit codes {[p.exitcode for p in procs]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_center_is_all_reduced(backend, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the ranks run on the CPU: the Triton path is covered there by the interpreter")
    results = _run_ranks(backend, tmp_path)
    # One process, the concatenated teacher batch.
    want = _initial_center().double()
    update_center_(want, torch.cat([_rank_inputs(r)[1] for r in range(WORLD)]).double(), 0.8)
    for r, res in enumerate(results):
        assert torch.equal(res["center"], results[0]["center"]), f"rank {r} centre differs from rank 0"
        # Each element sums WORLD·GLOBAL·BATCH fp32 terms (local sums, then the all-reduce).
        assert_close(res["center"], want, dtype=torch.float32, reduction=WORLD * GLOBAL * BATCH, name="center")
    # The ranks saw different batches, so their losses differ; the centre alone is shared.
    assert results[0]["loss"] != results[1]["loss"]
