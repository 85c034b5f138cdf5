"""One build description for the CUDA C++ extension in ``csrc/``, shared by setup.py (ahead of time,
``SDAE_FAST_BUILD_CUDA=1``) and just-in-time loading with ninja on first use on a CUDA machine.

Kernels live in plain ``.cu`` files behind a small torch binding (``*_binding.cpp``) so that CI,
which has nvcc but no torch CUDA headers, can at least compile the kernels (``tests/test_csrc_compiles``).
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

NAME = "sdae_fast_cuda"
# Hopper (H100/H200) and Ampere; PTX for newer parts. sm_80 code runs on every 8.x device and the
# compute_90 PTX on 9.0 and later, so nothing runs below 8.0: an older device (a T4 is 7.5) is
# refused with its compute capability (capability_reason) and the Triton or torch backend serves.
ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_90,code=compute_90"]
MIN_CAPABILITY = (8, 0)
# No -std: torch's build adds the C++ standard its headers need (C++20 from torch 2.10 on).
# No --use_fast_math: the kernels round exactly as the references do.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]


def csrc_dir() -> Path:
    """``csrc/`` in a source checkout, ``sdae_fast/csrc`` once installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    try:
        from . import csrc as _pkg  # installed through package_dir

        return Path(_pkg.__file__).parent
    except ImportError:
        raise FileNotFoundError("sdae_fast's csrc/ sources are missing from this installation")


def sources(root: Path | None = None) -> list[str]:
    root = root or csrc_dir()
    return sorted(str(p) for p in root.iterdir() if p.suffix in (".cu", ".cpp"))


def kernel_sources(root: Path | None = None) -> list[str]:
    """The plain ``.cu`` files: compile with nvcc alone, no torch headers."""
    return [s for s in sources(root) if s.endswith(".cu")]


def extension_kwargs(repo_root: str) -> dict:
    srcs = sources(Path(repo_root) / "csrc")
    return {
        "name": f"sdae_fast.{NAME}",
        "sources": [os.path.relpath(s, repo_root) for s in srcs],
        "extra_compile_args": {"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + ARCH_FLAGS},
    }


@functools.lru_cache(maxsize=None)
def _load():
    """The compiled module: a prebuilt one if installed, else a just-in-time ninja build."""
    try:
        from . import sdae_fast_cuda  # type: ignore[attr-defined]  # built by setup.py

        return sdae_fast_cuda, None
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import load

        if cannot := _cannot_build_reason():
            return None, cannot
        build_dir = jit_build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        # One build per node: every rank takes the lock; the first builds, the others find the
        # build done and only load it. flock is released when a process dies (no stale lock).
        with _node_lock(build_dir / "build.lock"):
            try:
                module = load(name=NAME, sources=sources(), extra_cflags=CXX_FLAGS,
                              extra_cuda_cflags=NVCC_FLAGS + ARCH_FLAGS, build_directory=str(build_dir),
                              verbose=False)
            except Exception as exc:
                return None, _build_failed(exc, build_dir / "build_error.log")
        return module, None
    except Exception as exc:  # a failed build must not break the other backends
        return None, f"the CUDA extension could not be built or loaded: {type(exc).__name__}: {_clip(str(exc))}"


def _cannot_build_reason() -> str | None:
    """Why no just-in-time build can start here (no device, no sources, no toolchain), or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if not sources():
        return "csrc/ holds no sources"
    return _toolchain_reason()


def _toolchain_reason() -> str | None:
    """A just-in-time build needs nvcc (CUDA_HOME, found by torch) and ninja: say so in a line
    rather than in a failed build's log."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None:
        return "no CUDA toolkit (nvcc) to build the CUDA extension just in time: set CUDA_HOME or put nvcc on PATH"
    if not (Path(home) / "bin" / "nvcc").exists():
        return f"no nvcc in CUDA_HOME={home} to build the CUDA extension just in time"
    if not cpp_extension.is_ninja_available():
        return "the CUDA extension is built just in time with ninja, which is not installed (pip install ninja)"
    return None


_BUILD_LOG = ""  # the last failed build's full message (ninja's log)


def build_log(tail: int = 8000) -> str:
    """The end of the last failed just-in-time build's log ('' when none failed)."""
    return _BUILD_LOG[-tail:]


def _clip(text: str, width: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[:width - 3] + "..."


def _build_failed(exc: Exception, log_path: Path) -> str:
    """A short reason (the first compiler error) for a failed build; the whole log is kept in
    :func:`build_log` and in ``log_path``."""
    global _BUILD_LOG
    text = _BUILD_LOG = str(exc)
    try:
        log_path.write_text(text)
        where = f"; log: {log_path}"
    except OSError:
        where = ""
    lines = text.splitlines()
    errors = [line for line in lines if "error" in line.lower() and "error building extension" not in line.lower()]
    first = _clip(errors[0] if errors else text, 160)
    return f"the CUDA extension failed to build ({type(exc).__name__}: {first}){where}"


def jit_build_dir() -> Path:
    """Where the just-in-time build lives (shared by the ranks of a node): ``SDAE_FAST_CUDA_BUILD_DIR``,
    else torch's extension directory."""
    env = os.environ.get("SDAE_FAST_CUDA_BUILD_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(NAME, verbose=False))


@contextlib.contextmanager
def _node_lock(path: Path):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def status() -> str:
    """For ``sdae-fast info``: whether the extension is built, without building it."""
    try:
        from . import sdae_fast_cuda  # type: ignore[attr-defined]  # noqa: F401

        return "prebuilt (setup.py, SDAE_FAST_BUILD_CUDA=1)"
    except ImportError:
        pass
    try:
        build_dir = jit_build_dir()
    except Exception as exc:  # torch without cpp_extension support
        return f"not built ({type(exc).__name__}: {exc})"
    if any(build_dir.glob(f"{NAME}*.so")):
        return f"built just in time in {build_dir}"
    return f"not built (built just in time into {build_dir} at first use on a CUDA device)"


def capability_reason(index: int) -> str | None:
    """Why device ``cuda:index`` cannot run the extension's code (ARCH_FLAGS), or None."""
    import torch

    capability = tuple(torch.cuda.get_device_capability(index))
    if capability < MIN_CAPABILITY:
        return (f"compute capability {capability[0]}.{capability[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} on "
                f"cuda:{index}: the CUDA extension is built for sm_80 and newer")
    return None


_JIT_BUILD = True  # False inside without_jit_build()


@contextlib.contextmanager
def without_jit_build():
    """Inside: report an extension that is not built yet as unavailable instead of building it
    (``sdae-fast info`` describes the backends; a first build takes minutes of nvcc)."""
    global _JIT_BUILD
    before, _JIT_BUILD = _JIT_BUILD, False
    try:
        yield
    finally:
        _JIT_BUILD = before


def unavailable_reason() -> str | None:
    if not _JIT_BUILD and _load.cache_info().currsize == 0 and not _built():
        return _cannot_build_reason() or ("the CUDA extension is not built yet: the first op on a CUDA device "
                                          "builds it just in time (sdae-fast info does not)")
    return _load()[1]


def _built() -> bool:
    """A prebuilt module is installed, or a just-in-time build is on disk (loading it is quick)."""
    return status().startswith(("prebuilt", "built"))


def extension():
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module
