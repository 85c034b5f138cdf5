"""Test tiers: plain CPU tests; Triton kernels under the interpreter when there is no GPU; GPU
tests (``@pytest.mark.gpu``) skipped without CUDA. Every launcher's output starts as NaN here."""
import os
import tempfile

import pytest
import torch

# Before any Triton kernel is defined: without a GPU, run the kernels in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Shard indexes of the tests' throwaway shards go to a throwaway folder, not the user's ~/.cache.
os.environ.setdefault("SDAE_FAST_SHARD_INDEX_CACHE", tempfile.mkdtemp(prefix="sdae_fast_shard_index_"))

import sdae_fast.alloc  # noqa: E402
import sdae_fast.checks  # noqa: E402

sdae_fast.alloc.POISON = True
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_checks():
    # A deferred check failed (on purpose) by one test must not surface in the next one's check_errors().
    sdae_fast.checks.clear()
    yield
    sdae_fast.checks.set_checks(None)


@pytest.fixture(params=["deferred", "eager"])
def checks_mode(request):
    """Run a bad-input test with deferred and with eager value checks: the pattern is
    ``with pytest.raises(E, match=...): op(...); sdae_fast.check_errors()``."""
    sdae_fast.checks.set_checks(request.param)
    return request.param
