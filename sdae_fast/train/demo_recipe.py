"""The ``demo`` recipe: hyperparameters tuned for the embedded digits (32 px, grey) on 2 CPU cores.

Kept apart from the ``paper`` recipes (the official ImageNet values, ``recipes.py``): these numbers
were chosen by measuring the k-NN / linear-probe gain on the digits, not taken from any paper.
Each entry overrides the pretrain defaults for that method; the loop and the CLI read nothing else.
"""
from __future__ import annotations

# Peak learning rates for the micro/digits runs (800 steps of 64): SdAE's k-NN accuracy drops below
# the random-init encoder's at 1e-3 but beats it at 3e-4; MAE and MixedAE do best at 1e-3.
DEMO = {
    "mae": {"lr": 1e-3},
    "sdae": {"lr": 3e-4},
    "mixedae": {"lr": 1e-3},
    "dino": {"lr": 3e-4},
}
