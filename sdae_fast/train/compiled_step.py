"""One whole training step (forward, backward, AdamW step, EMA update) as a single traceable function.

``torch.compile(fullgraph=True)`` of a plain loop body fails twice in PyTorch itself:
``loss.backward()`` is not traced unless ``torch._dynamo.config.trace_autograd_ops`` is on, and
``torch.optim.Optimizer.step`` always breaks the graph (``_use_grad_for_differentiable``) and refuses
to run on parameters whose ``.grad`` the same graph wrote. So the step here takes the gradients
with ``torch.autograd.grad`` and applies PyTorch's own functional AdamW
(``torch.optim.adamw.adamw``, ``capturable=True``) to the optimizer's state: the same update and
the same ``state_dict`` as ``optimizer.step()``, so checkpoints and resumes are unchanged.
The learning rate is read from ``optimizer.param_groups`` as a 0-dim tensor per group, so a new
value each step does not recompile.
"""
from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from .. import checks
from ..dispatch import cuda_graph_capturing


def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create the lazily made AdamW state up front (a traced step cannot create it)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:  # the step count on the parameter's device, as capturable AdamW wants it
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != p.device:  # capturable: the step count lives with the parameter
                state["step"] = state["step"].to(p.device)


def _adamw_(optimizer: torch.optim.AdamW, params: list, grads: list, lrs: list, wds: list) -> None:
    start = 0
    for group, lr, wd in zip(optimizer.param_groups, lrs, wds):
        ps = group["params"]
        gs = grads[start:start + len(ps)]
        start += len(ps)
        kept = [(p, g) for p, g in zip(ps, gs) if g is not None]
        if not kept:
            continue
        ps, gs = [p for p, _ in kept], [g for _, g in kept]
        states = [optimizer.state[p] for p in ps]
        beta1, beta2 = group["betas"]
        # capturable: the step count and lr stay on the device (no sync, no recompile); PyTorch's
        # eager AdamW accepts that on CUDA only, so an eager CPU step keeps host scalars.
        capturable = torch.compiler.is_compiling() or ps[0].is_cuda
        if capturable:  # AdamW's decoupled decay, first, as adamw applies it, with the wd a device value too
            torch._foreach_mul_(ps, 1 - lr * wd)  # wd 0: times exactly 1
        adamw(ps, gs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], foreach=True, capturable=capturable, amsgrad=False, beta1=beta1,
              beta2=beta2, lr=lr if capturable else float(group["lr"]),
              weight_decay=0.0 if capturable else group["weight_decay"], eps=group["eps"], maximize=False)


class TrainStep:
    """``step(images) -> loss`` (detached fp32 scalar): forward, backward, optional global gradient
    clip, AdamW, ``model.after_step()``; ``compile=True`` wraps it in ``torch.compile(fullgraph=True)``.

    ``net`` is what runs the forward (the model, or its DDP wrapper); ``model`` owns ``after_step``.

    Compiled, the schedules are device values (the lr and weight-decay tensors, the EMA momentum
    table, DINO's temperature table): one graph for the run. Captured in a CUDA graph
    (``torch.cuda.graph``, after eager warm-up steps), each replay reads its schedule on the device:
    call :meth:`write_schedules` before it for the lr and weight decay; the EMA's momentum and cadence
    and DINO's temperature follow the EMA's device step counter, which each replay advances. The
    host counters (``model.step``) advance at the capture only: advance them by the replays made
    before a checkpoint.
    """

    def __init__(self, net, model, optimizer, *, clip_grad=None, autocast=None, compile=False, backend="inductor"):
        if not isinstance(optimizer, torch.optim.AdamW):
            raise TypeError(f"TrainStep applies AdamW; got {type(optimizer).__name__}")
        self.net, self.model, self.optimizer = net, model, optimizer
        self.clip_grad, self.autocast = clip_grad, autocast
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        init_adamw_state(optimizer)
        device = self.params[0].device
        checks.prepare(device)  # outside the trace, not inside its first one (sdae_fast.checks.prepare)
        self._lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in optimizer.param_groups]
        self._wds = [torch.tensor(float(g["weight_decay"]), dtype=torch.float32, device=device)
                     for g in optimizer.param_groups]
        # EMA teachers built lazily (EmaTeacherMixin._ema_teacher, reset by .to() or set_schedule):
        # built before each step, on the host, so that a traced after_step finds its plan made.
        modules = model.modules() if isinstance(model, torch.nn.Module) else ()
        self._ema_teachers = [m._ema_teacher for m in modules if callable(getattr(m, "_ema_teacher", None))]
        self._fn = torch.compile(self._step, fullgraph=True, backend=backend) if compile else self._step

    def _step(self, images, lrs, wds):
        if self.autocast is not None:
            with self.autocast():
                loss = self.net(images)["loss"]
        else:
            loss = self.net(images)["loss"]
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        with torch.no_grad():
            if self.clip_grad:
                present = [g for g in grads if g is not None]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
                factor = (self.clip_grad / (norm + 1e-6)).clamp(max=1.0)
                grads = [None if g is None else g * factor for g in grads]
            _adamw_(self.optimizer, self.params, list(grads), lrs, wds)
            self.model.after_step()
        return loss.detach().float()

    def write_schedules(self) -> None:
        """The optimizer's lr and weight decay (``param_groups``) into the step's device values: each
        call does it, except inside a CUDA-graph capture (a fill there would replay its captured
        value); before each replay of a captured step, call this instead."""
        for group, lr, wd in zip(self.optimizer.param_groups, self._lrs, self._wds):
            lr.fill_(float(group["lr"]))  # host scalars into device memory: no sync, no recompile
            wd.fill_(float(group["weight_decay"]))

    def __call__(self, images):
        for ema_teacher in self._ema_teachers:
            ema_teacher().prepare()  # pairing and plan on the host: neither can be traced
        if not cuda_graph_capturing():
            self.write_schedules()
        with torch._dynamo.config.patch(trace_autograd_ops=True, allow_unspec_int_on_nn_module=True):
            return self._fn(images, self._lrs, self._wds)
