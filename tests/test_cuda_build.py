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


def test_info_describes_the_backends_without_building(tmp_path, monkeypatch):
    """`sdae-fast info` on a CUDA machine asks every op which backend serves it; for the EMA that
    went through the CUDA backend's availability check, which built the extension (minutes of nvcc,
    past the info step's limit on the GPU machine). Inside without_jit_build() a missing build is
    reported, never started; once built (on disk), it loads as before."""
    import torch
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("SDAE_FAST_CUDA_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_build, "_toolchain_reason", lambda: None)
    builds = []
    monkeypatch.setattr(cpp, "load", lambda **kwargs: builds.append(kwargs) or "module")
    cuda_build._load.cache_clear()
    try:
        with cuda_build.without_jit_build():
            assert "not built yet" in cuda_build.unavailable_reason()
        assert builds == []
        (tmp_path / f"{cuda_build.NAME}.so").write_bytes(b"")  # a build on disk: loading it is quick
        with cuda_build.without_jit_build():
            assert cuda_build.unavailable_reason() is None
        assert len(builds) == 1
    finally:
        cuda_build._load.cache_clear()


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
    monkeypatch.setattr(cuda_build, "_toolchain_reason", lambda: None)  # nvcc and ninja present
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


def test_binding_checks_table_lengths_and_the_kernel_pair_indices():
    """Host checks on the tables' shapes (their values are on the device: no sync to read them);
    the kernel traps on a pair index or start outside the tables instead of touching a stray address."""
    binding = (cuda_build.csrc_dir() / "ema_binding.cpp").read_text()
    assert "block_start.sizes() == block_tensor.sizes()" in binding
    assert "s_ptrs.sizes() == t_ptrs.sizes() && numels.sizes() == t_ptrs.sizes()" in binding
    assert "static_cast<int32_t>(t_ptrs.numel())" in binding  # the pair count reaches the kernel
    kernel = (cuda_build.csrc_dir() / "ema.cu").read_text()
    assert "if (pair < 0 || pair >= num_pairs) __trap();" in kernel


@pytest.mark.gpu
def test_binding_refuses_tables_of_unequal_length():
    import torch

    from sdae_fast import multi_tensor

    if cuda_build.unavailable_reason():
        pytest.skip(cuda_build.unavailable_reason())
    module = cuda_build.extension()
    (g,) = multi_tensor.pair_groups([torch.zeros(10000, device="cuda")], [torch.ones(10000, device="cuda")])
    with pytest.raises(RuntimeError, match="equal length"):
        module.ema_update(g.t_ptrs, g.s_ptrs, g.numels, g.block_tensor, g.block_start[:-1], 0, 0, 0.9, 0.1, None)
    with pytest.raises(RuntimeError, match="equal length"):
        module.ema_update(g.t_ptrs, g.s_ptrs.repeat(2), g.numels, g.block_tensor, g.block_start, 0, 0, 0.9, 0.1, None)
    with pytest.raises(RuntimeError, match="dtype code"):
        module.ema_update(g.t_ptrs, g.s_ptrs, g.numels, g.block_tensor, g.block_start, 3, 0, 0.9, 0.1, None)


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


class _OnCuda:
    """What the CUDA backend's common check reads of a tensor (no GPU here to make a real one)."""
    device = __import__("torch").device("cuda", 0)
    dtype = __import__("torch").float32

    def dim(self):
        return 1


@pytest.fixture
def jit_built(tmp_path, monkeypatch):
    """A CUDA machine whose just-in-time build succeeds (torch's load() faked: nothing compiles)."""
    import torch
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("SDAE_FAST_CUDA_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cpp, "load", lambda **kwargs: "module")
    clear = cuda_build._load.cache_clear  # a test may replace _load
    clear()
    yield
    clear()


@pytest.mark.parametrize("capability, refused", [((7, 5), True), ((8, 6), False), ((9, 0), False), ((12, 0), False)])
def test_a_device_older_than_sm_80_is_refused_with_its_capability(jit_built, monkeypatch, capability, refused):
    """The extension holds sm_80 and sm_90 code (+ compute_90 PTX): a T4 (7.5) would fail at launch with
    'no kernel image is available', so the backend says why it cannot serve, before building anything."""
    import torch

    from sdae_fast import dispatch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    built = []
    monkeypatch.setattr(cuda_build, "_load", lambda: built.append(1) or ("module", None))
    reasons = dispatch.cuda_why_not([_OnCuda(), _OnCuda()])
    if refused:
        assert reasons == [f"compute capability {capability[0]}.{capability[1]} < 8.0 on cuda:0: the CUDA extension "
                           f"is built for sm_80 and newer"] and not built
    else:
        assert reasons == [] and built


def test_cuda_availability_is_decided_on_the_host_under_compile(monkeypatch):
    """torch.compile of a function whose ops select a backend: the CUDA backend's availability
    (importing, perhaps building, the extension) is not traced (Dynamo cannot) but read as a
    constant of the graph. (torch.cuda.is_available stays real here: Dynamo itself asks it.)"""
    import torch

    from sdae_fast import dispatch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tensors = [_OnCuda()]
    eager = dispatch.cuda_why_not(tensors)

    def fn(x):
        return x + len(dispatch.cuda_why_not(tensors))

    cuda_build._load.cache_clear()
    torch._dynamo.reset()
    try:
        assert torch.compile(fn, backend="eager", fullgraph=True)(torch.zeros(1)).item() == len(eager)
    finally:
        cuda_build._load.cache_clear()


@pytest.fixture
def jit_machine(tmp_path, monkeypatch):
    """A CUDA machine without a prebuilt extension; torch's load() is replaced per test."""
    import torch
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("SDAE_FAST_CUDA_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp, "CUDA_HOME", str(tmp_path / "cuda"))
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp, "is_ninja_available", lambda: True)
    calls = []
    monkeypatch.setattr(cpp, "load", lambda **kwargs: calls.append(kwargs) or "module")
    cuda_build._load.cache_clear()
    yield cpp, calls
    cuda_build._load.cache_clear()


def test_a_missing_nvcc_or_ninja_is_a_short_reason_before_any_build(jit_machine, monkeypatch, tmp_path):
    cpp, calls = jit_machine
    monkeypatch.setattr(cpp, "is_ninja_available", lambda: False)
    assert cuda_build.unavailable_reason() == ("the CUDA extension is built just in time with ninja, which is not "
                                               "installed (pip install ninja)")
    cuda_build._load.cache_clear()
    (tmp_path / "cuda" / "bin" / "nvcc").unlink()
    assert cuda_build.unavailable_reason() == (f"no nvcc in CUDA_HOME={tmp_path / 'cuda'} to build the CUDA extension "
                                               f"just in time")
    cuda_build._load.cache_clear()
    monkeypatch.setattr(cpp, "CUDA_HOME", None)
    assert cuda_build.unavailable_reason() == ("no CUDA toolkit (nvcc) to build the CUDA extension just in time: set "
                                               "CUDA_HOME or put nvcc on PATH")
    assert not calls


def test_a_failed_build_gives_a_short_reason_and_keeps_the_log_tail(jit_machine, monkeypatch, tmp_path):
    cpp, _ = jit_machine
    log = ("Error building extension 'sdae_fast_cuda': [1/3] /usr/local/cuda/bin/nvcc " + "-I/include " * 150 + "\n"
           + "FAILED: ema.cuda.o\n" * 40
           + "/src/csrc/ema.cu(42): error: identifier \"kThreadz\" is undefined\n" + "1 error detected\n"
           + "ninja: build stopped")

    def failing_load(**kwargs):
        raise RuntimeError(log)

    monkeypatch.setattr(cpp, "load", failing_load)
    assert len(log) > 2000
    reason = cuda_build.unavailable_reason()
    assert len(reason) < 400, reason
    assert 'ema.cu(42): error: identifier "kThreadz" is undefined' in reason
    assert str(tmp_path / "build_error.log") in reason
    assert (tmp_path / "build_error.log").read_text() == log
    assert cuda_build.build_log().endswith("ninja: build stopped")
