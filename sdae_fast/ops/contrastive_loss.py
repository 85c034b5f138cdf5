"""MixedAE's homologous contrastive loss (SPEC §4): ``homologous_contrastive_loss``."""
from __future__ import annotations

from .. import checks, reference
from ..dispatch import op
from ..validate import INDEX_DTYPES, check_same_device, check_shape, check_temperature, check_tensor, names_its_errors

CONTRASTIVE_LOSS = op("homologous_contrastive_loss", auto_order=("triton", "torch"),
                      schema="(Tensor z, Tensor labels, *, float temperature=0.07, bool normalize=True) -> Tensor")
NEGATIVE_LABEL = checks.register("homologous_contrastive_loss", IndexError,
                                 "labels must be non-negative source ids, found {v0}")
CONTRASTIVE_LOSS.register("torch")(reference.homologous_contrastive_loss)


def _triton_why_not(z, labels, **_):
    # D is streamed in chunks, so any width works; an empty launch grid does not.
    return [f"z {tuple(z.shape)} is empty"] if z.numel() == 0 else []


@CONTRASTIVE_LOSS.register("triton", why_not=_triton_why_not)
def _triton(*args, **kwargs):
    from ..kernels.contrastive_loss import homologous_contrastive_loss as fused

    return fused(*args, **kwargs)


@names_its_errors('homologous_contrastive_loss')
def homologous_contrastive_loss(z, labels, *, temperature=0.07, normalize=True, backend=None):
    """Within each mixed image, pull together tokens from the same source; fp32 scalar (float64 for
    float64 z, on the torch reference only: for fidelity checks; triton refuses it).

    z (M, N, D) token features; labels (M, N) non-negative integer source ids (a negative one is an
    IndexError at the next ``sdae_fast.check_errors()``, or at the call with
    ``SDAE_FAST_CHECKS=eager``; no host sync). Anchors without a positive are skipped; with none
    at all the loss is 0. ``temperature`` must be at least
    :data:`sdae_fast.validate.MIN_TEMPERATURE` (1e-4): below it the fp32 similarities / T can
    overflow and the loss or its gradient become NaN (see there).

    Backends: ``torch`` (the reference) and ``triton`` (flash-style: similarities in tiles, never
    an (M, N, N) tensor; the backward recomputes them).
    """
    check_tensor("z", z, ndim=3)
    check_tensor("labels", labels, ndim=2, dtypes=INDEX_DTYPES)
    check_shape("labels", labels, z.shape[:2])
    check_same_device(z=z, labels=labels)
    temperature = check_temperature("temperature", temperature)
    checks.not_negative(NEGATIVE_LABEL, labels)
    return CONTRASTIVE_LOSS(z, labels, temperature=temperature, normalize=normalize, backend=backend)
