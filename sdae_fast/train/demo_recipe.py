"""The ``demo`` recipe: hyperparameters tuned for the embedded digits (32 px, grey) on 2 CPU cores.

Kept apart from the ``paper`` recipes (the official ImageNet values, ``recipes.py``): these numbers
were chosen by measuring the k-NN / linear-probe gain on the digits, not taken from any paper.
Each entry fills the pretrain options the command line leaves unset for that method: ``lr`` (peak,
absolute) and ``epochs`` always, any other option by its name (``clip_grad``, ``weight_decay``, ...),
and ``model``: keyword arguments of ``sdae_fast.models.build``, applied to ``--size micro`` runs only
(the sizes meant for real data keep the method's own defaults).
"""
from __future__ import annotations

# Peak learning rates for the micro/digits runs (batch 64): SdAE's k-NN accuracy drops below
# the random-init encoder's at 1e-3 but beats it at 3e-4; MAE and MixedAE do best at 1e-3.
DEMO = {
    "mae": {"lr": 1e-3, "epochs": 36, "model": {}},
    "sdae": {"lr": 3e-4, "epochs": 36, "model": {}},
    "mixedae": {"lr": 1e-3, "epochs": 36, "model": {}},
    "dino": {"lr": 3e-4, "epochs": 36, "model": {}},
}


def demo_model_kwargs(method: str, size: str) -> dict:
    """The demo recipe's model options for ``method`` at ``size`` (none beyond ``micro``)."""
    return dict(DEMO[method]["model"]) if size == "micro" else {}
