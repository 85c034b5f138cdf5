"""The CUDA extension's just-in-time build: once per node under a file lock, and reported by
``sdae-fast info`` without building anything."""
import fcntl

import pytest

from sdae_fast import cuda_build


def test_status_reports_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("SDAE_FAST_CUDA_BUILD_DIR", str(tmp_path))
    assert cuda_build.status().startswith("not built")
    (tmp_path / f"{cuda_build.NAME}.so").write_bytes(b"")
    assert cuda_build.status() == f"built just in time in {tmp_path}"


def test_jit_build_runs_under_the_node_lock(tmp_path, monkeypatch):
    """Every rank calls load() holding an exclusive flock on the shared build directory, so one
    builds and the others wait, then find the build done."""
    import torch
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("SDAE_FAST_CUDA_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs)
        with open(tmp_path / "build.lock") as other:  # another rank: the lock is taken
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "module"

    monkeypatch.setattr(cpp, "load", fake_load)
    cuda_build._load.cache_clear()
    try:
        assert cuda_build._load() == ("module", None)
    finally:
        cuda_build._load.cache_clear()
    assert seen["build_directory"] == str(tmp_path) and seen["name"] == cuda_build.NAME
    with open(tmp_path / "build.lock") as after:  # released once built
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_binding_checks_block_table_layout_and_momentum_device():
    source = (cuda_build.csrc_dir() / "ema_binding.cpp").read_text()
    assert "block_tensor.is_contiguous()" in source
    assert "m_device->device() == t_ptrs.device()" in source


@pytest.mark.gpu
def test_binding_refuses_a_strided_block_table_and_a_momentum_elsewhere():
    import torch

    from sdae_fast import multi_tensor

    if cuda_build.unavailable_reason():
        pytest.skip(cuda_build.unavailable_reason())
    module = cuda_build.extension()
    t, s = torch.zeros(10000, device="cuda"), torch.ones(10000, device="cuda")
    (g,) = multi_tensor.pair_groups([t], [s])
    args = (g.t_ptrs, g.s_ptrs, g.numels)
    strided = g.block_tensor.repeat_interleave(2)[::2]
    with pytest.raises(RuntimeError, match="contiguous"):
        module.ema_update(*args, strided, g.block_start, 0, 0, 0.9, 0.1, None)
    with pytest.raises(RuntimeError, match="momentum"):
        module.ema_update(*args, g.block_tensor, g.block_start, 0, 0, 0.9, 0.1, torch.tensor([0.9]))


def _setup_kwargs(monkeypatch, build_cuda):
    """setup.py's kwargs to ``setuptools.setup`` (recorded, nothing built), with or without
    ``SDAE_FAST_BUILD_CUDA=1``."""
    import runpy
    from pathlib import Path

    import setuptools

    root = Path(__file__).resolve().parent.parent
    if build_cuda:
        monkeypatch.setenv("SDAE_FAST_BUILD_CUDA", "1")
    else:
        monkeypatch.delenv("SDAE_FAST_BUILD_CUDA", raising=False)
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: seen.update(kwargs))
    monkeypatch.chdir(root)
    runpy.run_path(str(root / "setup.py"), run_name="__main__")
    return seen


def test_setup_builds_the_extension_only_when_asked(monkeypatch):
    plain = _setup_kwargs(monkeypatch, build_cuda=False)
    assert plain["name"] == "sdae_fast" and "ext_modules" not in plain and "cmdclass" not in plain
    built = _setup_kwargs(monkeypatch, build_cuda=True)
    (ext,) = built["ext_modules"]
    assert ext.name == f"sdae_fast.{cuda_build.NAME}"  # imported by cuda_build as sdae_fast.sdae_fast_cuda
    assert sorted(s.rsplit("/", 1)[-1] for s in ext.sources) == ["ema.cu", "ema_binding.cpp"]
    assert all(not s.startswith("/") for s in ext.sources)  # setuptools wants paths relative to setup.py
    assert set(cuda_build.ARCH_FLAGS) <= set(ext.extra_compile_args["nvcc"])
    from torch.utils.cpp_extension import BuildExtension

    assert issubclass(built["cmdclass"]["build_ext"], BuildExtension)
    assert {k: v for k, v in built.items() if k not in ("ext_modules", "cmdclass")} == plain
