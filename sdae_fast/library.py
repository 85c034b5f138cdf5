"""``torch.ops.sdae_fast``: every public op registered with PyTorch's dispatcher (``torch.library``).

Two layers, so that the host alone picks the backend (from static properties, SPEC §5) while
``torch.compile``, ``torch.export`` and CUDA graphs see everything below it:

* **the public op**, ``torch.ops.sdae_fast.<name>(..., backend=...)``: a ``CompositeImplicitAutograd``
  op that runs the named backend's entry point. The reference is plain PyTorch, so autograd,
  fake tensors and Inductor go straight through it; a fused backend calls its kernel ops.
* **the kernel ops**, ``torch.ops.sdae_fast.<name>_triton`` / ``..._backward`` (defined next to
  each launcher in ``sdae_fast/kernels``): ``torch.library.triton_op`` whose launches go through
  ``wrap_triton``, so Inductor sees the Triton kernels; each has ``register_fake`` and, where
  differentiable, ``register_autograd`` over its backward op. The in-place EMA and the CUDA C++
  path are opaque ``custom_op`` s with ``mutates_args``.

Under ``TRITON_INTERPRET=1`` (the CPU test tier) ``wrap_triton`` cannot trace: the interpreter runs
the kernel on the fake tensors of the trace and fails on their data pointers. There the kernel
ops are registered as opaque ``custom_op`` s instead, which run the same launcher eagerly and
trace through their fake kernels, so opcheck and ``torch.compile`` still cover them.
"""
from __future__ import annotations

import os

import torch

NAMESPACE = "sdae_fast"
LIB = torch.library.Library(NAMESPACE, "DEF")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def define_public(name: str, schema: str, impls: dict) -> None:
    """``torch.ops.sdae_fast.<name>``: ``schema`` (argument list, ``-> ...``) gains a kwarg-only
    ``str backend`` that picks ``impls[backend].fn``."""
    head, _, ret = schema.rpartition("->")
    args = head.strip()[1:-1]
    sep = ", " if "*" in args else ", *, "
    LIB.define(f"{name}({args}{sep}str backend) -> {ret.strip()}")

    def composite(*args, backend, **kwargs):
        return impls[backend].fn(*args, **kwargs)

    LIB.impl(name, composite, "CompositeImplicitAutograd")


def kernel_op(name: str, mutates_args=()):
    """Decorator: ``torch.ops.sdae_fast.<name>`` over a launcher (see the module docstring)."""
    qualname = f"{NAMESPACE}::{name}"
    if interpreting():
        return torch.library.custom_op(qualname, mutates_args=mutates_args)
    return torch.library.triton_op(qualname, mutates_args=mutates_args)


def launch(kernel):
    """``kernel`` as a kernel op's body must launch it: ``wrap_triton`` on the GPU, as is in the interpreter."""
    if interpreting():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def refuse_double_backward(name) -> None:
    """Raise, inside a kernel op's backward, when autograd records it (create_graph=True): the
    backward kernels have no derivative of their own, and the error should say so and where to go."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"{name}: no double backward through the fused kernel; use backend='torch' for "
                                  "second derivatives")


def register_kernel_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd`` for a kernel op whose backward launches kernels of its own: a
    second derivative through it is refused by name (:func:`refuse_double_backward`)."""
    name = getattr(op, "_qualname", op)

    def refusing_double_backward(ctx, *grads):
        refuse_double_backward(name)
        return backward(ctx, *grads)

    op.register_autograd(refusing_double_backward, setup_context=setup_context)


def register_saved_grad_autograd(op, scale) -> None:
    """Autograd of a Liger-style loss kernel op whose outputs are ``(loss, grad, factor)``: the
    forward already wrote d loss / d (first input) for a unit upstream gradient, so the backward is
    ``scale(grad, grad_loss, factor)`` (plain torch, traced as is) and no other input gets one."""

    def setup_context(ctx, inputs, output):
        _, grad, factor = output
        ctx.mark_non_differentiable(grad, factor)  # the kernel's constants, not functions to differentiate
        # The grad and factor outputs never receive a gradient: None, not a full-size zero fill of
        # the input's size at every backward. (The saved gradient is scaled into a new tensor, not
        # in place: it is also an output of the kernel op, which a backward must not change.)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad, factor)
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_loss, _grad, _factor):
        if grad_loss is None:  # the loss itself took no gradient
            return (None,) * ctx.num_inputs
        # create_graph=True: a second derivative would need d grad / d input, which the kernel
        # never forms; the saved gradient is a constant, so going on would give a silent zero.
        refuse_double_backward(getattr(op, "_qualname", op))
        grad, factor = ctx.saved_tensors
        return (scale(grad, grad_loss, factor),) + (None,) * (ctx.num_inputs - 1)

    op.register_autograd(backward, setup_context=setup_context)
