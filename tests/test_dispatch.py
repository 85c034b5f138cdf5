"""Backend selection (SPEC §5): argument, then environment, then automatic; clear refusals."""
import pytest
import torch

import sdae_fast
from sdae_fast import dispatch


def _inputs():
    x = torch.randn(2, 6, 4)
    return x, torch.randint(0, 6, (2, 3))


def test_reference_is_automatic_without_cuda(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x, idx = _inputs()
    assert dispatch.OPS["gather_tokens"].select(None, x, idx).backend == "torch"


def _toy_op():
    """An op with every backend registered, so the common reasons are what decides."""
    toy = dispatch.Op("toy")
    for backend in dispatch.BACKENDS:
        toy.register(backend, why_not=(lambda x: ["x is too wide"] if x.shape[-1] > 8 else []))(
            lambda x, b=backend: b)
    return toy


def test_forced_backend_lists_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    toy = _toy_op()
    with pytest.raises(sdae_fast.BackendUnavailable, match="TRITON_INTERPRET"):
        toy(torch.zeros(3), backend="triton")
    with pytest.raises(sdae_fast.BackendUnavailable, match="too wide"):
        toy(torch.zeros(9), backend="torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert toy(torch.zeros(3), backend="triton") == "triton"
    # Automatic on CPU tensors is the reference, even when the interpreter could run them.
    assert toy(torch.zeros(3)) == "torch"
    with pytest.raises(sdae_fast.BackendUnavailable, match="CUDA device"):
        toy(torch.zeros(3), backend="cuda")


def test_environment_variable_forces(monkeypatch):
    x, idx = _inputs()
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(sdae_fast.BackendUnavailable, match=dispatch.ENV_VAR):
        sdae_fast.gather_tokens(x, idx)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert sdae_fast.gather_tokens(x, idx).shape == (2, 3, 4)
    # The argument wins over the environment.
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert sdae_fast.gather_tokens(x, idx, backend="torch").shape == (2, 3, 4)


def test_unknown_backend():
    x, idx = _inputs()
    with pytest.raises(sdae_fast.BackendUnavailable, match="unknown backend"):
        sdae_fast.gather_tokens(x, idx, backend="tpu")


def test_bf16_refused_by_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reasons = _toy_op().reasons("triton", torch.zeros(3, dtype=torch.bfloat16))
    assert any("bf16" in r for r in reasons)


def test_every_spec_op_is_registered_with_a_reference():
    expected = {"gather_tokens", "unshuffle_tokens", "ema_update_", "topk_attention", "cosine_loss",
                "masked_mse_loss", "dino_loss", "homologous_contrastive_loss"}
    assert expected <= set(dispatch.OPS)
    for name in expected:
        assert "torch" in dispatch.OPS[name].impls


def test_info_command_runs(capsys):
    from sdae_fast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "gather_tokens: automatic -> torch" in out
