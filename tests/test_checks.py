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
