"""Deferred value checks (sdae_fast.checks): modes, the first failure kept, several reported at once."""
import pytest
import torch

import sdae_fast
from sdae_fast import checks


def test_mode_from_env_read_at_call(monkeypatch):
    x, bad = torch.randn(1, 4, 2), torch.tensor([[5]])
    monkeypatch.setenv(checks.ENV_VAR, "eager")
    with pytest.raises(IndexError, match=r"gather_tokens: index values must lie in \[0, 4\), found range \[5, 5\]"):
        sdae_fast.gather_tokens(x, bad)  # at the call, no check_errors() needed
    monkeypatch.setenv(checks.ENV_VAR, "deferred")
    sdae_fast.gather_tokens(x, bad)  # recorded, not raised
    with pytest.raises(IndexError, match="found range"):
        sdae_fast.check_errors()
    monkeypatch.setenv(checks.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="SDAE_FAST_CHECKS"):
        sdae_fast.gather_tokens(x, torch.tensor([[1]]))


def test_set_checks_overrides_env(monkeypatch):
    monkeypatch.setenv(checks.ENV_VAR, "deferred")
    sdae_fast.set_checks("eager")
    assert checks.checks_mode() == "eager"
    sdae_fast.set_checks(None)
    assert checks.checks_mode() == "deferred"
    with pytest.raises(ValueError, match="checks mode"):
        sdae_fast.set_checks("loud")


def test_first_failure_kept_and_others_listed():
    x = torch.randn(1, 4, 2)
    sdae_fast.gather_tokens(x, torch.tensor([[7]]))
    sdae_fast.gather_tokens(x, torch.tensor([[9]]))  # same check: the first failure is the one kept
    sdae_fast.masked_mse_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.zeros(1, 2))
    with pytest.raises(IndexError, match=r"found range \[7, 7\] \(also failed: masked_mse_loss: mask selects"):
        sdae_fast.check_errors()
    sdae_fast.check_errors()  # cleared


def test_good_values_record_nothing():
    sdae_fast.gather_tokens(torch.randn(2, 4, 3), torch.randint(0, 4, (2, 2)))
    sdae_fast.homologous_contrastive_loss(torch.randn(1, 4, 3), torch.tensor([[0, 1, 0, 1]]))
    assert checks.pending() == []


@pytest.mark.interpreter
def test_triton_index_check_writes_what_the_torch_check_writes():
    """The one-launch Triton check (used for CUDA indices) records the same row as the torch ops."""
    from sdae_fast.dispatch import triton_why_not
    from sdae_fast.testing import triton_device

    device = triton_device()
    if triton_why_not([torch.empty(0, device=device)]):
        pytest.skip("needs Triton (GPU or interpreter)")
    import sdae_fast.kernels.value_checks  # noqa: F401

    check = checks.register("test_op", IndexError, "index values must lie in [0, {v2}), found range [{v0}, {v1}]")
    ok, bad = torch.randint(0, 6, (5, 3), device=device), torch.tensor([[0, 9], [-2, 3]], device=device)
    table = checks._table(torch.device(device))
    torch.ops.sdae_fast.check_values_triton(ok, table, 0, 6, 1 + check.slot, False)
    assert checks.pending() == []
    torch.ops.sdae_fast.check_values_triton(bad[:, ::2], table, 0, 6, 1 + check.slot, False)  # [[0], [-2]]
    torch.ops.sdae_fast.check_values_triton(bad, table, 0, 6, 1 + check.slot, False)  # the first failure is kept
    row = table[1 + check.slot].tolist()
    checks.clear()
    sdae_fast.set_checks("deferred")
    for index in (ok, bad[:, ::2].cpu(), bad.cpu()):  # the torch-op path, on the CPU table
        checks.index_in_range(check, index.cpu(), 6)
    assert checks._table(torch.device("cpu"))[1 + check.slot].tolist() == row == [1, -2, 0, 6, 0]
    with pytest.raises(IndexError, match=r"test_op: index values must lie in \[0, 6\), found range \[-2, 0\]"):
        sdae_fast.check_errors()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8])
def test_triton_all_zero_check(dtype):
    from sdae_fast.dispatch import triton_why_not
    from sdae_fast.testing import triton_device

    device = triton_device()
    if triton_why_not([torch.empty(0, device=device)]):
        pytest.skip("needs Triton (GPU or interpreter)")
    import sdae_fast.kernels.value_checks  # noqa: F401

    check = checks.register("test_mask", ValueError, "mask selects no patch")
    table = checks._table(torch.device(device))
    some = torch.tensor([[0, 0.5], [0, 0]]) if dtype == torch.float32 else torch.tensor([[0, 1], [0, 0]])
    torch.ops.sdae_fast.check_values_triton(some.to(dtype).to(device), table, 0, 0, 1 + check.slot, True)
    assert checks.pending() == []
    torch.ops.sdae_fast.check_values_triton(torch.zeros(2, 3, dtype=dtype, device=device), table, 0, 0,
                                            1 + check.slot, True)
    with pytest.raises(ValueError, match="test_mask: mask selects no patch"):
        sdae_fast.check_errors()


def test_meta_tensors_skip_value_checks():
    """Shape inference on meta tensors: no values, so nothing to check and nothing recorded."""
    out = sdae_fast.gather_tokens(torch.randn(2, 5, 3, device="meta"), torch.zeros(2, 2, dtype=torch.int64,
                                                                                      device="meta"))
    assert out.is_meta and out.shape == (2, 2, 3)
    sdae_fast.check_errors()


def test_a_first_call_under_inference_mode_leaves_later_calls_working(monkeypatch):
    monkeypatch.setattr(checks, "_TABLES", {})  # the table is made by the first op on a device
    x, index = torch.randn(2, 5, 3), torch.tensor([[0, 1], [2, 3]])
    with torch.inference_mode():
        sdae_fast.gather_tokens(x, index)
    assert not checks._TABLES["cpu"].is_inference()
    sdae_fast.gather_tokens(x, index)  # failed: "Inplace update to inference tensor outside InferenceMode"
    sdae_fast.gather_tokens(x, torch.tensor([[0, 9], [1, 2]]))
    with torch.inference_mode(), pytest.raises(IndexError, match=r"gather_tokens: .*\[0, 9\]"):
        sdae_fast.check_errors()


def test_prepare_of_a_bare_cuda_device_is_the_current_devices_table(monkeypatch):
    """`pretrain` prepares torch.device("cuda"), while ops record under their tensors' cuda:0: one
    table, not a dead "cuda" one beside it (the real one was then made inside the first trace)."""
    made = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(checks, "_table", lambda device: made.append(str(device)))
    checks.prepare("cuda")
    checks.prepare(torch.device("cuda", 1))
    checks.prepare("cpu")
    assert made == ["cuda:0", "cuda:1", "cpu"]
