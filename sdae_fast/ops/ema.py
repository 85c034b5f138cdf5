"""EMA teacher update (SPEC §2): ``ema_update_``."""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, reference
from ..dispatch import op
from ..validate import FLOAT_DTYPES, check_float, names_its_errors

EMA = op("ema_update_", auto_order=("cuda", "triton", "torch"))
MOMENTUM_RANGE = checks.register("ema_update_", ValueError, "the momentum tensor must lie in [0, 1], got {f0}")
EMA.register("torch")(reference.ema_update_)


def _fused_why_not(teacher, student, momentum) -> list[str]:
    """The multi-tensor kernels address each tensor as one flat run of elements, in fp32/fp16/bf16.
    (The common float64 rule exempts 0-dim tensors, for the momentum: a 0-dim pair is refused here.)"""
    reasons = []
    wide = [i for i, (t, s) in enumerate(zip(teacher, student)) if torch.float64 in (t.dtype, s.dtype)]
    if wide:
        reasons.append(f"pairs {wide[:5]} are float64: the torch reference serves them (the kernels compute in fp32)")
    bad = [i for i, (t, s) in enumerate(zip(teacher, student)) if not (t.is_contiguous() and s.is_contiguous())]
    if bad:
        reasons.append(f"pairs {bad[:5]} are not contiguous (the multi-tensor kernels read flat storage)")
    tied, crossed = _overlaps(teacher, student)
    if tied:  # timm's EMA of a tied weight lerps it once per name: only one pair after another does that
        reasons.append(f"teacher tensors {tied[:3]} share memory (tied weights, or overlapping views): the fused "
                       f"kernels update the pairs in parallel, the reference one after another")
    if crossed:
        reasons.append(f"teacher tensors overlap students {crossed[:3]} (teacher, student) other than being exactly "
                       f"their own: the fused kernels would read a student while another block writes it")
    return reasons


def _overlaps(teacher, student) -> tuple[list, list]:
    """Pairs (i, j) of teacher tensors whose memory overlaps (the same tensor twice, or views of one
    buffer that share elements), and (i, j) where teacher i overlaps student j, unless student j
    is exactly teacher i (j == i, the same span).
    Host-side: data pointers and sizes only (the fused kernels take contiguous tensors)."""
    def spans(tensors, kind):
        return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), kind, i)
                for i, t in enumerate(tensors) if t.numel()]

    every = sorted(spans(teacher, 0) + spans(student, 1))
    # The common case, every span apart, in one pass; any shared span (also a pair's student that
    # is its own teacher, which is fine) goes on to the listing below.
    reach = 0
    for start, end, _, _ in every:
        if start < reach:
            break
        reach = end
    else:
        return [], []
    tied, crossed = [], []
    open_spans = []  # spans still open at the current start, in start order
    for start, end, kind, i in every:
        open_spans = [o for o in open_spans if o[1] > start]
        for other_start, other_end, other_kind, j in open_spans:
            if kind == other_kind == 0:
                tied.append((min(i, j), max(i, j)))
            elif kind != other_kind and not (i == j and (start, end) == (other_start, other_end)):
                # Only a pair's student that is exactly its teacher is fine (each element updated
                # from itself, a no-op); a partial overlap with its own student races like another's.
                crossed.append((i, j) if kind == 0 else (j, i))
        open_spans.append((start, end, kind, i))
    return sorted(tied), sorted(crossed)


def _triton_launch(groups, momentum):
    from ..kernels.ema import launch

    launch(groups, momentum)


def _cuda_launch(groups, momentum):
    from ..cuda_build import extension
    from ..multi_tensor import DTYPE_CODES, momentum_args

    if not groups:
        return
    module = extension()
    m, one_minus_m, m_tensor = momentum_args(momentum, groups[0].t_ptrs.device)
    for g in groups:
        module.ema_update(g.t_ptrs, g.s_ptrs, g.numels, g.block_tensor, g.block_start, DTYPE_CODES[g.t_dtype],
                          DTYPE_CODES[g.s_dtype], m, one_minus_m, m_tensor)


# Fused backends launch over block tables; EmaUpdate keeps the tables, the public op looks them up.
_LAUNCHERS = {"triton": _triton_launch, "cuda": _cuda_launch}


@EMA.register("triton", why_not=_fused_why_not)
def _ema_triton(teacher, student, momentum):
    from ..multi_tensor import pair_groups

    _triton_launch(pair_groups(teacher, student), momentum)


@EMA.register("cuda", why_not=_fused_why_not)
def _ema_cuda(teacher, student, momentum):
    from ..multi_tensor import pair_groups

    _cuda_launch(pair_groups(teacher, student), momentum)


# Block tables planned once by an EmaUpdate, looked up by the op through an int handle (an op's
# arguments are tensors and scalars; the plan's pointer tables stay on the device between steps),
# with the addresses they were planned for: handle -> (addresses, groups).
_PLANS: dict[int, tuple[tuple[int, ...], list]] = {}


def _addresses(teacher, student) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in teacher) + tuple(s.data_ptr() for s in student)


def _planned_groups(plan: int, teacher, student) -> list:
    """The plan's tables if it was made for these very tensors, else tables for the tensors handed
    in: functionalization without reinplacing (aot_eager) passes copies, which are what must be
    updated (launching on the plan's addresses would update the originals, then the copy-back would
    overwrite them). A host-side comparison of addresses, no device sync."""
    entry = _PLANS.get(plan)
    if entry is not None and entry[0] == _addresses(teacher, student):
        return entry[1]
    from ..multi_tensor import pair_groups

    return pair_groups(teacher, student)


@torch.library.custom_op("sdae_fast::ema_update_", mutates_args=("teacher",))
def ema_update_op(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float,
                  momentum_tensor: Optional[torch.Tensor], backend: str, plan: int) -> None:
    """``torch.ops.sdae_fast.ema_update_``: opaque to torch.compile (pointer tables cannot be traced),
    in place on ``teacher``. ``momentum_tensor`` (0-dim, on the device) wins over ``momentum``;
    ``plan`` is an :class:`EmaUpdate`'s handle to its block tables, or -1 to plan here."""
    m = momentum if momentum_tensor is None else momentum_tensor
    if plan >= 0 and backend in _LAUNCHERS:
        _LAUNCHERS[backend](_planned_groups(plan, teacher, student), m)
    else:
        EMA.impls[backend].fn(teacher, student, m)


@ema_update_op.register_fake
def _ema_fake(teacher, student, momentum, momentum_tensor, backend, plan) -> None:
    return None


def _split_momentum(momentum):
    return (0.0, momentum) if isinstance(momentum, torch.Tensor) else (float(momentum), None)


def as_tensor_list(x, name: str) -> list[torch.Tensor]:
    """A module gives its parameters (in order); a sequence gives its tensors."""
    if isinstance(x, torch.nn.Module):
        return [p.data for p in x.parameters()]
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors or a module, not a single tensor")
    out = list(x)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return [t.data if isinstance(t, torch.nn.Parameter) else t for t in out]


def validate_pairs(teacher, student) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The pairs as two tensor lists, after checking lengths, shapes, dtypes and devices."""
    teacher = as_tensor_list(teacher, "teacher")
    student = as_tensor_list(student, "student")
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"pair {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if t.dtype not in FLOAT_DTYPES or s.dtype not in FLOAT_DTYPES:
            raise TypeError(f"pair {i}: dtypes must be float32/float16/bfloat16/float64, got {t.dtype} and {s.dtype}")
        if t.device != s.device or t.device != teacher[0].device:
            raise ValueError(f"pair {i}: every tensor must be on one device, got {t.device} and {s.device}")
        if t.is_inference() and not torch.is_inference_mode_enabled():
            # As torch's in-place ops refuse it; a fused kernel writing through the pointer would not.
            raise RuntimeError(f"pair {i}: the teacher tensor is an inference tensor, which cannot be updated in "
                               f"place outside torch.inference_mode(); clone it outside inference mode first")
    return teacher, student


def validate_momentum(momentum, device) -> None:
    """A float in [0, 1], or a 0-dim floating tensor on ``device`` (its value is checked on the
    device, reported by ``sdae_fast.check_errors()``: no sync)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0:
            raise ValueError(f"momentum must be a float or a 0-dim tensor, got shape {tuple(momentum.shape)}")
        if not momentum.is_floating_point():
            raise TypeError(f"momentum must be a float or a 0-dim floating tensor, got dtype {momentum.dtype}")
        if device is not None and momentum.device != device:
            raise ValueError(f"momentum is on {momentum.device} but the tensors are on {device}")
        checks.fail_if(MOMENTUM_RANGE, ~((momentum >= 0) & (momentum <= 1)), checks.float_bits(momentum))  # NaN fails
    else:
        check_float("momentum", momentum, ge=0.0, le=1.0, kind="a float or a 0-dim tensor")


@names_its_errors('ema_update_')
def ema_update_(teacher, student, momentum, *, backend=None) -> None:
    """``t <- momentum·t + (1 - momentum)·s`` for every pair, in fp32, rounded once to t's dtype.

    teacher, student: equal-length sequences of tensors or modules (parameters paired by order);
    dtypes may differ per pair (a bf16 teacher of an fp32 student). momentum: float, or a 0-dim
    tensor on the tensors' device (no host sync). A float64 pair is updated in float64, on the torch
    reference only (for fidelity checks; triton and cuda refuse it). A training loop that updates the same pairs every
    step should hold an :class:`EmaUpdate` instead: it validates and plans once.
    """
    teacher, student = validate_pairs(teacher, student)
    validate_momentum(momentum, teacher[0].device if teacher else None)
    if not teacher:
        return
    impl = EMA.select(backend, teacher, student, momentum)  # on the host, from static properties only
    torch.ops.sdae_fast.ema_update_(teacher, student, *_split_momentum(momentum), impl.backend, -1)


class EmaUpdate:
    """:func:`ema_update_` bound to fixed pairs: validation, backend choice and the fused backends'
    block tables happen once, so a step costs a launch per dtype group and a host-side check that
    the op was handed the planned tensors (their addresses; ~25 µs for 200 pairs). Handed others
    (copies, under functionalization) it pairs those. The pairs must keep their storage: rebuild
    it after ``module.to(...)`` or a reassigned ``.data``.
    """

    def __init__(self, teacher, student, *, backend=None):
        self.teacher, self.student = validate_pairs(teacher, student)
        self.device = self.teacher[0].device if self.teacher else None
        self.impl = EMA.select(backend, self.teacher, self.student, 0.5) if self.teacher else None
        self._launch = _LAUNCHERS.get(self.impl.backend) if self.impl else None
        self._plan = -1
        if self._launch is not None:
            from ..multi_tensor import pair_groups

            self._groups = pair_groups(self.teacher, self.student)
            self._plan = id(self)
            _PLANS[self._plan] = (_addresses(self.teacher, self.student), self._groups)

    @property
    def backend(self) -> str | None:
        return self.impl.backend if self.impl else None

    def __call__(self, momentum) -> None:
        validate_momentum(momentum, self.device)
        if self.impl is None:
            return
        torch.ops.sdae_fast.ema_update_(self.teacher, self.student, *_split_momentum(momentum), self.impl.backend,
                                        self._plan)

    def __del__(self):
        if getattr(self, "_plan", -1) == id(self):  # a copy holds its original's handle: not its own to drop
            _PLANS.pop(self._plan, None)
