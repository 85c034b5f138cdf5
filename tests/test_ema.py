"""ema_update_: every backend that runs here against the reference, to within 1 ulp of the teacher dtype."""
import re

import pytest
import torch

import sdae_fast
from sdae_fast import reference
from sdae_fast.testing import compile_for_hopper, triton_device

DEVICE = triton_device()
FUSED = ["triton"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES_HERE = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
SHAPES = [(), (1,), (7,), (4097,), (33, 65), (3, 5, 7), (8192,), (2, 4096 + 3)]


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of x, in x's dtype (as fp64)."""
    x64 = x.double()
    up = torch.nextafter(x, torch.full_like(x, float("inf"))).double()
    return (up - x64).abs()


def pairs(t_dtype, s_dtype, shapes=SHAPES, device=DEVICE):
    teacher = [torch.randn(s, device=device).to(t_dtype) for s in shapes]
    student = [torch.randn(s, device=device).to(s_dtype) for s in shapes]
    return teacher, student


def check_within_ulp(got, expected):
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape
        err = (g.double() - e.double()).abs()
        assert (err <= ulp(e)).all(), f"tensor {i}: max error {err.max()} over 1 ulp"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("t_dtype", DTYPES_HERE)
@pytest.mark.parametrize("s_dtype", DTYPES_HERE)
@pytest.mark.parametrize("tensor_momentum", [False, True])
def test_matches_reference(backend, t_dtype, s_dtype, tensor_momentum):
    teacher, student = pairs(t_dtype, s_dtype)
    momentum = torch.tensor(0.9731, device=DEVICE) if tensor_momentum else 0.9731
    expected = [t.clone() for t in teacher]
    reference.ema_update_(expected, student, momentum)
    before = [s.clone() for s in student]
    sdae_fast.ema_update_(teacher, student, momentum, backend=backend)
    check_within_ulp(teacher, expected)
    for s, b in zip(student, before):
        assert torch.equal(s, b), "the student must not change"


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("t_dtype", DTYPES_HERE)
@pytest.mark.parametrize("momentum", [0.996, 0.9996, 0.123456789, 0.5])
def test_a_float64_momentum_tensor_updates_exactly_as_its_float(backend, t_dtype, momentum):
    """1 - m is formed in float64 and then rounded for a tensor too: fp32(1 - m) is what a Python
    float gives (and DINO's ``mul_(m).add_((1 - m) * s)``), where 1 - fp32(m) differs by ulps of
    1 - m (0.996: 8e-9 against 2e-10); torch.compile's TrainStep passes the momentum as a tensor."""
    teacher, student = pairs(t_dtype, torch.float32)
    by_float, by_tensor = [t.clone() for t in teacher], [t.clone() for t in teacher]
    sdae_fast.ema_update_(by_float, student, momentum, backend=backend)
    m = torch.tensor(momentum, dtype=torch.float64, device=DEVICE)
    sdae_fast.ema_update_(by_tensor, student, m, backend=backend)
    for a, b in zip(by_float, by_tensor):
        assert torch.equal(a, b)
    sdae_fast.check_errors()


@pytest.mark.parametrize("backend", FUSED)
def test_mixed_dtype_pairs_in_one_call(backend):
    t1, s1 = pairs(torch.float16, torch.float32, [(5, 7), (100,)])
    t2, s2 = pairs(torch.float32, torch.float32, [(3,), (4099,)])
    teacher, student = [t1[0], t2[0], t1[1], t2[1]], [s1[0], s2[0], s1[1], s2[1]]
    expected = [t.clone() for t in teacher]
    reference.ema_update_(expected, student, 0.5)
    sdae_fast.ema_update_(teacher, student, 0.5, backend=backend)
    check_within_ulp(teacher, expected)


@pytest.mark.parametrize("backend", FUSED)
def test_many_tensors_modules_and_extremes(backend):
    student = torch.nn.Sequential(*[torch.nn.Linear(5, 3) for _ in range(40)]).to(DEVICE)
    teacher = torch.nn.Sequential(*[torch.nn.Linear(5, 3) for _ in range(40)]).to(DEVICE)
    expected = [p.detach().clone() for p in teacher.parameters()]
    reference.ema_update_(expected, [p.detach() for p in student.parameters()], 0.996)
    sdae_fast.ema_update_(teacher, student, 0.996, backend=backend)
    check_within_ulp([p.detach() for p in teacher.parameters()], expected)
    # momentum 1 keeps the teacher; momentum 0 copies the student.
    t, s = pairs(torch.float32, torch.float32, [(17,)])
    keep = t[0].clone()
    sdae_fast.ema_update_(t, s, 1.0, backend=backend)
    assert torch.equal(t[0], keep)
    sdae_fast.ema_update_(t, s, 0.0, backend=backend)
    assert torch.equal(t[0], s[0])


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_empty_lists_and_empty_tensors(backend):
    sdae_fast.ema_update_([], [], 0.9, backend=backend)
    t, s = [torch.zeros(0, device=DEVICE), torch.ones(3, device=DEVICE)], [torch.zeros(0, device=DEVICE), torch.zeros(3, device=DEVICE)]
    sdae_fast.ema_update_(t, s, 0.5, backend=backend)
    assert torch.equal(t[1], torch.full((3,), 0.5, device=DEVICE))


@pytest.mark.parametrize("backend", FUSED)
def test_misaligned_views_take_the_unaligned_group(backend):
    from sdae_fast import multi_tensor

    base_t, base_s = torch.randn(2 * 4096 + 9, device=DEVICE), torch.randn(2 * 4096 + 9, device=DEVICE)
    teacher, student = [base_t[1:], torch.randn(4096, device=DEVICE)], [base_s[1:], torch.randn(4096, device=DEVICE)]
    assert sorted(g.aligned for g in multi_tensor.pair_groups(teacher, student)) == [False, True]
    expected = [t.clone() for t in teacher]
    reference.ema_update_(expected, student, 0.9)
    sdae_fast.ema_update_(teacher, student, 0.9, backend=backend)
    check_within_ulp(teacher, expected)


def test_kernel_compiles_for_hopper():
    signature = {"t_ptrs": "*i64", "s_ptrs": "*i64", "numels": "*i64", "block_tensor": "*i32", "block_start": "*i64",
                 "m_ptr": "*fp32", "m": "fp32", "one_minus_m": "fp32", "T_DTYPE": "constexpr",
                 "S_DTYPE": "constexpr", "M_ON_DEVICE": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr"}
    variants = [{"T_DTYPE": "tl.float32", "S_DTYPE": "tl.float32", "M_ON_DEVICE": False, "ALIGNED": True, "BLOCK": 4096},
                {"T_DTYPE": "tl.bfloat16", "S_DTYPE": "tl.float32", "M_ON_DEVICE": True, "ALIGNED": False, "BLOCK": 4096}]
    compile_for_hopper("sdae_fast.kernels.ema", "_ema_kernel", signature, variants, num_warps=8)


def test_repeated_calls_reuse_the_cached_tables():
    from sdae_fast import multi_tensor

    teacher, student = pairs(torch.float32, torch.float32, [(10,), (20,)])
    multi_tensor._CACHE.clear()
    for _ in range(3):
        sdae_fast.ema_update_(teacher, student, 0.9, backend="triton")
    assert len(multi_tensor._CACHE) == 1


def test_non_contiguous_is_refused_by_fused_and_served_by_reference():
    t = torch.randn(6, 4, device=DEVICE).t()
    s = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(sdae_fast.BackendUnavailable, match="not contiguous"):
        sdae_fast.ema_update_([t], [s], 0.5, backend="triton")
    expected = t.clone()
    reference.ema_update_([expected], [s], 0.5)
    sdae_fast.ema_update_([t], [s], 0.5)
    assert torch.equal(t, expected)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(), (3,)])
def test_float64_pairs_are_refused_by_fused_and_served_by_reference(backend, shape):
    # A 0-dim float64 pair too: only the momentum may be a 0-dim float64 tensor the kernels read.
    t, s = torch.ones(shape, dtype=torch.float64, device=DEVICE), torch.full(shape, 2.0, device=DEVICE)
    with pytest.raises(sdae_fast.BackendUnavailable, match=r"pairs \[0\] are float64"):
        sdae_fast.ema_update_([t], [s], 0.9, backend=backend)
    with pytest.raises(sdae_fast.BackendUnavailable, match="float64"):
        sdae_fast.ops.ema.EmaUpdate([t], [s], backend=backend)
    sdae_fast.ema_update_([t], [s], torch.tensor(0.9, dtype=torch.float64, device=DEVICE))
    assert torch.equal(t, torch.full(shape, 0.9 + 0.1 * 2.0, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_a_momentum_tensor_out_of_range_is_reported(value):
    t, s = [torch.zeros(3, device=DEVICE)], [torch.ones(3, device=DEVICE)]
    sdae_fast.ema_update_(t, s, torch.tensor(value, device=DEVICE))  # no sync: reported, not raised
    named = re.escape(repr(float(torch.tensor(value))))  # the value as the fp32 tensor holds it
    with pytest.raises(ValueError, match=rf"ema_update_: the momentum tensor must lie in \[0, 1\], got {named}$"):
        sdae_fast.check_errors()
    sdae_fast.checks.set_checks("eager")
    with pytest.raises(ValueError, match=rf"momentum tensor must lie in \[0, 1\], got {named}$"):
        sdae_fast.ema_update_(t, s, torch.tensor(value, device=DEVICE))
    sdae_fast.checks.set_checks(None)
    sdae_fast.ops.ema.EmaUpdate(t, s)(torch.tensor(value, device=DEVICE))
    with pytest.raises(ValueError, match="momentum tensor"):
        sdae_fast.check_errors()
    sdae_fast.ema_update_(t, s, torch.tensor(1.0, device=DEVICE))
    sdae_fast.check_errors()  # 0 and 1 are in range


@pytest.mark.parametrize("teacher,student,momentum,error,match", [
    ([torch.zeros(3)], [], 0.9, ValueError, "teacher has 1 tensors but student has 0"),
    ([torch.zeros(3)], [torch.zeros(4)], 0.9, ValueError, "shape"),
    ([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)], 0.9, TypeError, "dtypes"),
    ([torch.zeros(3)], [torch.zeros(3)], 1.5, ValueError, r"\[0, 1\]"),
    ([torch.zeros(3)], [torch.zeros(3)], torch.zeros(2), ValueError, "0-dim"),
    (torch.zeros(3), [torch.zeros(3)], 0.9, TypeError, "single tensor"),
    ([torch.zeros(3)], ["x"], 0.9, TypeError, "must be a tensor"),
])
def test_bad_input(teacher, student, momentum, error, match):
    with pytest.raises(error, match=match):
        sdae_fast.ema_update_(teacher, student, momentum)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_teacher_and_misaligned_views_on_gpu(backend):
    # Views starting one element in are not 16-byte aligned: the kernels' scalar path.
    teacher = [torch.randn(3 * 4096 + 5, device="cuda").bfloat16()[1:], torch.randn(8, device="cuda").bfloat16()]
    student = [torch.randn(3 * 4096 + 5, device="cuda")[1:], torch.randn(8, device="cuda")]
    expected = [t.clone() for t in teacher]
    m = torch.tensor(0.99, device="cuda")
    reference.ema_update_(expected, student, m)
    sdae_fast.ema_update_(teacher, student, m, backend=backend)
    check_within_ulp(teacher, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_more_than_2_to_the_31_bytes(backend):
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) // 4 + 4099  # > 2^31 bytes of fp32
    if free < 4 * n * 4:
        pytest.skip("not enough GPU memory")
    t = torch.randn(n, device="cuda")
    s = torch.randn(n, device="cuda")
    expected = t.clone()
    reference.ema_update_([expected], [s], 0.9)
    sdae_fast.ema_update_([t], [s], 0.9, backend=backend)
    check_within_ulp([t[-10000:]], [expected[-10000:]])
    check_within_ulp([t[:10000]], [expected[:10000]])


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_planned_update_matches_the_op(backend):
    from sdae_fast.ops.ema import EmaUpdate

    teacher, student = pairs(torch.float16, torch.float32, [(5, 7), (4097,), ()])
    twin = [t.clone() for t in teacher]
    update = EmaUpdate(teacher, student, backend=backend)
    assert update.backend == backend
    for m in (0.9, 0.99, torch.tensor(0.5, device=DEVICE)):
        update(m)
        sdae_fast.ema_update_(twin, student, m, backend=backend)
    for a, b in zip(teacher, twin):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        update(2.0)
    import copy

    from sdae_fast.ops.ema import _PLANS

    twin_update = copy.deepcopy(update)
    del twin_update  # a copy going away leaves the original's plan in place
    assert update._plan in _PLANS or backend == "torch"  # the reference has no plan


@pytest.mark.parametrize("backend", FUSED)
def test_a_tied_teacher_tensor_is_updated_once_per_pair_by_the_reference(backend):
    """timm's EMA lerps a weight tied under two names twice; fused blocks updating it in parallel
    would race on a GPU, so the fused backends refuse and the automatic choice takes the reference."""
    t = torch.zeros(5, device=DEVICE)
    teacher = [t, torch.zeros(3, device=DEVICE), t]
    student = [torch.ones(5, device=DEVICE), torch.ones(3, device=DEVICE), torch.ones(5, device=DEVICE)]
    with pytest.raises(sdae_fast.BackendUnavailable, match=r"teacher tensors \[\(0, 2\)\] share memory"):
        sdae_fast.ema_update_(teacher, student, 0.5, backend=backend)
    sdae_fast.ema_update_(teacher, student, 0.5)  # automatic: the reference, one pair after another
    assert torch.equal(t, torch.full((5,), 0.75, device=DEVICE))  # 0 -> 0.5 -> 0.75


@pytest.mark.parametrize("backend", FUSED)
def test_overlapping_views_are_left_to_the_reference(backend):
    """Views of one buffer that share elements without sharing a first address (the tied-weight test
    compares addresses only), and a teacher that is another pair's student: both would race in
    parallel fused blocks, so both are refused and the reference updates them in order."""
    buf = torch.zeros(12, device=DEVICE)
    teacher = [buf[0:8], buf[4:12]]
    student = [torch.ones(8, device=DEVICE), torch.ones(8, device=DEVICE)]
    with pytest.raises(sdae_fast.BackendUnavailable, match=r"teacher tensors \[\(0, 1\)\] share memory"):
        sdae_fast.ema_update_(teacher, student, 0.5, backend=backend)
    sdae_fast.ema_update_(teacher, student, 0.5)  # the reference: pair 0, then pair 1
    expected = torch.tensor([0.5] * 4 + [0.75] * 4 + [0.5] * 4, device=DEVICE)
    assert torch.equal(buf, expected)
    a, b = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(sdae_fast.BackendUnavailable, match=r"overlap students \[\(0, 1\)\]"):
        sdae_fast.ema_update_([a, b], [torch.ones(4, device=DEVICE), a], 0.5, backend=backend)
    with pytest.raises(sdae_fast.BackendUnavailable, match=r"overlap students \[\(0, 0\)\]"):  # its own, shifted
        sdae_fast.ema_update_([buf[0:8]], [buf[4:12]], 0.5, backend=backend)
    sdae_fast.ema_update_([a], [a], 0.5, backend=backend)  # a pair's own student: element by element, fine
    assert torch.equal(a, torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_planned_update_under_compile(backend, compile_backend):
    """aot_eager functionalizes without reinplacing: the op gets copies of the teacher, then copies
    them back. A plan launched on its saved pointers updated the real teacher, then the copy-back
    overwrote it (the EMA did nothing); the op must update what it is handed."""
    from sdae_fast.ops.ema import EmaUpdate

    teacher, student = pairs(torch.float32, torch.float16, [(5, 7), (4097,)])
    expected = [t.clone() for t in teacher]
    update = EmaUpdate(teacher, student, backend=backend)
    torch._dynamo.reset()
    step = torch.compile(lambda m: update(m), backend=compile_backend, fullgraph=True)
    for m in (0.9, torch.tensor(0.75, device=DEVICE)):
        reference.ema_update_(expected, student, m)
        step(m)
        for a, b in zip(teacher, expected):
            assert torch.equal(a, b)


def test_new_tables_inside_a_cuda_graph_capture_are_refused(monkeypatch):
    """Making the block tables copies them to the device, which a CUDA graph capture forbids: a clear
    error instead of the capture's own, and cached tables (the update run once before) still serve."""
    from sdae_fast.multi_tensor import pair_groups

    teacher, student = pairs(torch.float32, torch.float32, [(5,), (7,)])
    cached = pair_groups(teacher, student)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert pair_groups(teacher, student) is cached
    with pytest.raises(RuntimeError, match="CUDA graph is being captured: run the update once before"):
        pair_groups(*pairs(torch.float32, torch.float32, [(3,)]))


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_an_inference_teacher_is_refused_outside_inference_mode(backend):
    """torch refuses an in-place update of an inference tensor outside inference_mode; a fused
    kernel writing through its pointer silently did it. Every backend now says why, before any launch."""
    with torch.inference_mode():
        teacher = torch.zeros(4, device=DEVICE)
    with pytest.raises(RuntimeError, match="pair 0: the teacher tensor is an inference tensor"):
        sdae_fast.ema_update_([teacher], [torch.ones(4, device=DEVICE)], 0.5, backend=backend)
    with torch.inference_mode():
        sdae_fast.ema_update_([teacher], [torch.ones(4, device=DEVICE)], 0.5, backend=backend)
    assert torch.equal(teacher, torch.full((4,), 0.5, device=DEVICE))
