"""Offline sm_90 (Hopper) compile of Triton kernel variants, and the facts of the compiled code.

No GPU is needed: Triton lowers a kernel to PTX, its bundled ``ptxas`` assembles a cubin for
sm_90a, and ``cuobjdump`` reads back what the interpreter can never show — registers per thread,
stack (spill) bytes, shared memory, and the SASS instructions (FFMA contraction, HGMMA = wgmma,
HMMA = mma.sync, STL/LDL = spills).

Compiles run in a fresh process with ``TRITON_INTERPRET=0`` (under the interpreter ``@triton.jit``
yields interpreted functions, which the compiler cannot take). Triton's own on-disk cache makes a
repeated compile cheap; the facts of a variant are cached next to it (``SDAE_FAST_SM90_CACHE``,
default ``~/.cache/sdae_fast/sm90``), keyed by the kernel's source hash, the variant and Triton's
version, so a CI run with a warm cache only re-reads JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

FACTS_VERSION = 3  # bump when a fact is added: cached facts of older versions are recompiled
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one sm_90 block may use
# SASS opcodes worth counting: MMA kind, fp32 arithmetic, spills.
COUNTED = ("HGMMA", "HMMA", "FFMA", "FMUL", "FADD", "STL", "LDL")


@dataclass(frozen=True)
class Facts:
    """One compiled variant: ``registers`` per thread, ``stack`` bytes per thread (spills),
    ``shared`` bytes per block (Triton's allocation), ``sass`` opcode counts (:data:`COUNTED`)."""
    kernel: str
    variant: str
    registers: int
    stack: int
    shared: int
    sass: dict = field(default_factory=dict)
    fma_params: list = field(default_factory=list)  # fp32 scalar arguments some fma.rn.f32 reads (PTX)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.sass.get("STL", 0) > 0

    @property
    def mma(self) -> str:
        """HGMMA (wgmma), HMMA (mma.sync), FFMA (no tensor-core instruction, but FMAs: exact fp32
        dots or plain arithmetic) or '-'."""
        for kind in ("HGMMA", "HMMA"):
            if self.sass.get(kind):
                return kind
        return "FFMA" if self.sass.get("FFMA") else "-"

    def row(self) -> str:
        s = self.sass
        return (f"| {self.kernel} | {self.variant} | {self.registers} | {self.stack} | {self.shared} | {self.mma} | "
                f"{s.get('FFMA', 0)} | {s.get('STL', 0)}/{s.get('LDL', 0)} |")

    def table_row(self, note: str = "") -> str:
        return f"{self.row()} {note} |"


TABLE_HEADER = ("| kernel | variant | registers | stack B | shared B | MMA | FFMA | STL/LDL | note |\n"
                "|---|---|---|---|---|---|---|---|---|")


def _cache_dir() -> Path:
    return Path(os.environ.get("SDAE_FAST_SM90_CACHE", Path.home() / ".cache" / "sdae_fast" / "sm90"))


def compile_facts(jobs: list[dict]) -> list[Facts]:
    """Facts for each job ``{module, name, signature, constants, options, label}`` (see
    :mod:`sdae_fast.kernel_variants`); ``constants`` may carry ``"tl.<dtype>"`` strings for dtype
    constexprs. Raises RuntimeError when the toolchain is missing (the caller decides to skip)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "SDAE_FAST_SM90_CACHE": str(_cache_dir())}
    out = subprocess.run([sys.executable, "-m", "sdae_fast.sm90"], input=json.dumps(jobs), env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sm_90 compile failed:\n{out.stderr[-6000:]}")
    result = json.loads(out.stdout.splitlines()[-1])
    if isinstance(result, dict):
        raise ToolchainMissing(result["skip"])
    return [Facts(**f) for f in result]


class ToolchainMissing(RuntimeError):
    """No Triton NVIDIA backend, ptxas or cuobjdump here: nothing can be compiled offline."""


# ------------------------------------------------------------------------------------------------
# The compiling side (runs in the child process).
# ------------------------------------------------------------------------------------------------
def _tools():
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = bindir / "cuobjdump"
    if not cuobjdump.exists():
        raise RuntimeError(f"no cuobjdump next to Triton's ptxas ({bindir})")
    return str(cuobjdump)


def _read_cubin(cubin: bytes, cuobjdump: str, tmp: Path) -> tuple[int, int, dict]:
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    # An instruction line: /*addr*/  [@P0 | @!UP1 ]OPCODE[.modifiers] operands ;
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)", sass)
    return regs, stack, {op: ops.count(op) for op in COUNTED if op in ops}


def _fma_params(ptx: str, name: str, signature: dict) -> list[str]:
    """The fp32 scalar arguments whose register an ``fma.rn.f32`` reads: a product with them was
    contracted into a fused multiply-add (rounded once where separate ops round twice). Kernel
    parameters are the non-constexpr arguments in order (``<name>_param_<i>`` in the PTX)."""
    runtime = [arg for arg, kind in signature.items() if kind != "constexpr"]
    lines = [line.strip() for line in ptx.splitlines()]
    fmas = [line for line in lines if line.startswith("fma.rn.f32")]
    # One-source copies of a register (mov, neg: the compiler negates a scalar to fold a
    # subtraction into an FMA) carry the parameter on: follow them.
    copies = re.findall(r"^(?:mov|neg)\.(?:b32|f32)\s+(%\w+),\s*(%\w+);", "\n".join(lines), flags=re.M)
    used = []
    for i, arg in enumerate(runtime):
        if signature[arg] != "fp32":
            continue
        regs = set(re.findall(rf"ld\.param\.(?:b32|f32)\s+(%\w+),\s*\[{re.escape(name)}_param_{i}\]", ptx))
        while True:
            more = {dst for dst, src in copies if src in regs} - regs
            if not more:
                break
            regs |= more
        if any(re.search(rf"{re.escape(reg)}\b", line) for reg in regs for line in fmas):
            used.append(arg)
    return used


def _compile_one(job: dict, cuobjdump: str, tmp: Path) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    kernel = kernel if hasattr(kernel, "params") else kernel.fn  # an Autotuner wraps the JITFunction
    as_const = lambda v: getattr(triton.language, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
    constants = {k: as_const(v) for k, v in job["constants"].items()}
    key = hashlib.sha256(json.dumps([FACTS_VERSION, triton.__version__, kernel.cache_key, job["signature"],
                                     job["constants"], job["options"]], sort_keys=True).encode()).hexdigest()
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        return {**json.loads(cached.read_text()), "variant": job["label"]}
    compiled = triton.compile(ASTSource(kernel, job["signature"], constants), target=GPUTarget("cuda", 90, 32),
                              options=job["options"])
    regs, stack, sass = _read_cubin(compiled.asm["cubin"], cuobjdump, tmp)
    facts = dict(kernel=job["name"], variant=job["label"], registers=regs, stack=stack,
                 shared=int(compiled.metadata.shared), sass=sass,
                 fma_params=_fma_params(compiled.asm["ptx"], job["name"], job["signature"]))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_file.write_text(json.dumps(facts))
    tmp_file.replace(cached)  # atomic: concurrent runs never read half a file
    return facts


def _main() -> None:
    import tempfile

    jobs = json.loads(sys.stdin.read())
    try:
        cuobjdump = _tools()
        from triton.backends.compiler import GPUTarget  # noqa: F401  (the offline-compile API)
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:
        print(json.dumps({"skip": f"offline sm_90 toolchain unavailable: {exc}"}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        facts = [_compile_one(job, cuobjdump, Path(tmp)) for job in jobs]
    print(json.dumps(facts))


if __name__ == "__main__":
    _main()
