"""Host overhead per op call (issue 11): tiny inputs, so a call's time is what the host spends on it.

Each case times 20 back-to-back calls of one public op on inputs a few KB large, and the table's
"median ms" is per 20 calls (÷ 20 for µs per call: 1 ms / 20 = 50 µs). The math is negligible at
these sizes, so on the GPU the CUDA-event time of the stream is set by how fast the host queues
the launches, and on the CPU it is wall time. Variants:

* ``checks=eager``: value checks at the call, one device->host sync each: how every op ran before
  the deferred checks (the "current path" of the issue);
* ``checks=deferred``: the default, no sync (the "new path");
* ``kernel op``: ``torch.ops.sdae_fast.<name>_triton`` called directly (GPU only): the floor left
  when validation and backend choice are skipped.
"""
from __future__ import annotations

import torch

from .harness import Case, register

CALLS = 20


def _inputs(device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, pos, pre = rand(2, 16, 32), rand(16, 32), rand(1, 32)
    index = torch.randint(0, 16, (2, 4), generator=g).to(device)
    ids = torch.stack([torch.randperm(16, generator=g) for _ in range(2)]).to(device)
    labels = torch.randint(0, 4, (2, 16), generator=g).to(device)
    mask = (torch.rand(2, 16, generator=g) > 0.25).float().to(device)
    return dict(x=x, pos=pos, pre=pre, index=index, ids=ids, vis=rand(2, 5, 32), token=rand(32), labels=labels,
                mask=mask, pred=rand(2, 16, 48), target=rand(2, 16, 48), z=rand(2, 16, 32))


def _public_calls(t):
    import sdae_fast as sf

    return {
        "gather_tokens": lambda: sf.gather_tokens(t["x"], t["index"], pos_embed=t["pos"], prefix=t["pre"]),
        "unshuffle_tokens": lambda: sf.unshuffle_tokens(t["vis"], t["ids"], t["token"], pos_embed=None, num_prefix=1),
        "masked_mse_loss": lambda: sf.masked_mse_loss(t["pred"], t["target"], t["mask"]),
        "homologous_contrastive_loss": lambda: sf.homologous_contrastive_loss(t["z"], t["labels"]),
    }


def _kernel_calls(t):
    from ..kernels.gather_tokens import gather_tokens
    from ..kernels.unshuffle_tokens import unshuffle_tokens

    return {
        "gather_tokens": lambda: gather_tokens(t["x"], t["index"], pos_embed=t["pos"], prefix=t["pre"]),
        "unshuffle_tokens": lambda: unshuffle_tokens(t["vis"], t["ids"], t["token"], num_prefix=1),
    }


def _make(device, name, variant):
    def make():
        import sdae_fast

        t = _inputs(device)
        call = (_kernel_calls(t) if variant == "kernel op" else _public_calls(t))[name]
        mode = variant.removeprefix("checks=") if variant.startswith("checks=") else None

        def run():
            sdae_fast.set_checks(mode)
            try:
                for _ in range(CALLS):
                    call()
            finally:
                sdae_fast.set_checks(None)
            sdae_fast.checks.clear()

        return run

    return make


@register("host_overhead")
def host_overhead_cases(device: str, quick: bool) -> list[Case]:
    out = []
    for name in ("gather_tokens", "unshuffle_tokens", "masked_mse_loss", "homologous_contrastive_loss"):
        variants = ["checks=eager", "checks=deferred"]
        if device == "cuda" and name in ("gather_tokens", "unshuffle_tokens"):
            variants.append("kernel op")
        for variant in variants:
            out.append(Case(f"{name} host overhead", f"{CALLS} calls, tiny fp32", variant, _make(device, name, variant),
                            note=f"median ms per {CALLS} calls; µs per call = ms × {1000 // CALLS}; no L2 flush "
                                 "(a flush in flight would hide host time)", flush_l2=False))
    return out
