"""The GPU case list of ``sdae-fast bench`` is generated without a GPU (nothing is run): a
generator that fails while listing cases would otherwise kill the whole report on the lent GPU
before the first case. Plus: the timed calls of the fwd+bwd cases leave no ``.grad`` behind."""
from __future__ import annotations

import pytest
import torch

from sdae_fast.bench import harness
from test_pretrain import _one_thread  # noqa: F401  (autouse: one torch thread on the shared CPU)


@pytest.mark.parametrize("quick", [False, True])
def test_cuda_case_list_is_generated_on_a_cpu_machine(quick):
    cases = harness.cases("cuda", quick)  # end_to_end builds ViT-B under torch.device("meta")
    groups = {c.op.split()[0] for c in cases}
    for expected in ("topk_attention", "gather_tokens", "ema_update_", "mae", "dino_loss", "loader"):
        assert expected in groups, sorted(groups)
    assert all("cuda" in c.devices for c in cases)
    e2e = [c for c in cases if c.op.endswith("train step") and not c.op.startswith("compat")]
    assert e2e and all(c.flops > 0 for c in e2e)  # the meta-device FLOP count ran



def test_quick_cuda_selection_cuts_the_heavy_groups():
    full, quick = harness.cases("cuda", False), harness.cases("cuda", True)
    assert len(quick) < len(full) // 2, (len(quick), len(full))
    for prefix in ("compat", "mae train step", "dino train step"):
        assert sum(c.op.startswith(prefix) for c in quick) < sum(c.op.startswith(prefix) for c in full), prefix
    # On the GPU --quick keeps real shapes (the smallest), not the CPU's tiny ones.
    assert not any("tiny" in c.shape or "micro" in c.shape for c in quick if c.op.split()[-1] != "overhead")
    assert all(c.slow for c in quick if c.op.startswith("compat") or c.op.endswith("train step"))


def test_attention_flops_are_dense_equivalent_forward_times_3_5_with_backward():
    cases = [c for c in harness.cases("cuda", False, ["topk_attention"]) if c.variant == "naive"]
    by_op = {}
    for c in cases:
        by_op.setdefault(c.shape, {})[c.op] = c
    b, h, n, d = 64, 12, 197, 64  # ViT-B B=64
    fwd = by_op["ViT-B B=64 topk=49 bfloat16"]
    assert fwd["topk_attention fwd"].flops == 4 * b * h * n * n * d
    assert fwd["topk_attention fwd+bwd"].flops == int(3.5 * 4 * b * h * n * n * d)
    assert all("dense-equivalent" in c.note for c in cases)



def _leaves_after_two_calls(case):
    captured = []
    real = torch.Tensor.requires_grad_

    def spy(t, flag=True):
        captured.append(t)
        return real(t, flag)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "requires_grad_", spy)
        fn = case.make()
    fn()
    fn()
    return [t for t in captured if t.requires_grad]


@pytest.mark.parametrize("op", ["gather_tokens fwd+bwd", "unshuffle_tokens fwd+bwd"])
def test_masking_fwd_bwd_timed_call_accumulates_no_grad(op):
    case = next(c for c in harness.cases("cpu", True, ["masking"]) if c.op == op and c.variant == "naive")
    leaves = _leaves_after_two_calls(case)
    assert leaves and all(t.grad is None for t in leaves)


def test_mixedae_own_timed_call_accumulates_no_grad(monkeypatch):
    from sdae_fast.bench import mixedae_own

    # The fused backend needs Triton on a GPU; the reference gather is what the timed call wraps here.
    monkeypatch.setattr(mixedae_own, "BACKEND", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cases = harness.cases("cpu", True, ["mixedae_own"])
    assert cases
    for case in cases:
        leaves = _leaves_after_two_calls(case)
        assert leaves and all(t.grad is None for t in leaves), case.variant
