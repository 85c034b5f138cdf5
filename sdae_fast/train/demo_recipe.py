"""The ``demo`` recipe: hyperparameters tuned for the embedded digits (32 px, grey) on 2 CPU cores.

Kept apart from the ``paper`` recipes (the official ImageNet values, ``recipes.py``): these numbers
were chosen by measuring the k-NN / linear-probe gain on the digits, not taken from any paper.
Each entry fills the pretrain options the command line leaves unset for that method: ``lr`` (peak,
absolute) and ``epochs`` always, any other option by its name (``clip_grad``, ``weight_decay``, ...),
and ``model``: keyword arguments of ``sdae_fast.models.build``, applied to ``--size micro`` runs only
(the sizes meant for real data keep the method's own defaults).
"""
from __future__ import annotations

# Measured on the digits, 1 thread, k-NN / linear probe on the 359 held-out images (README table):
# * SdAE: 1e-3 drops k-NN below random init, 3e-4 beats it; 36 -> 80 epochs lifts k-NN +3.3 -> +8.4 pts
#   and the linear probe +2.5 -> +2.8 (100 epochs: k-NN +9.2, linear only +1.4).
# * MAE, MixedAE: 1e-3, 36 epochs (MAE at 100 epochs falls back to random-init k-NN).
# * DINO: at init the teacher's logits vary across images by ~0.016 (std), well under its 0.04
#   temperature, so the centred targets hardly depend on the image: student and teacher drift to
#   the uniform solution (loss ~ ln 256 = 5.55). A 0.02 teacher temperature sharpens them (loss
#   3.5); the fixed sincos table gives the tokens their position from step 0 (the learned table
#   starts at std 0.02, so the class token sees a bag of patches: random-init k-NN 0.52 -> 0.70);
#   no drop-path on 3 blocks; clipping at 3.0 as DINO does. k-NN stays at the random-init level.
DEMO = {
    "mae": {"lr": 1e-3, "epochs": 36, "model": {}},
    "sdae": {"lr": 3e-4, "epochs": 80, "model": {}},
    "mixedae": {"lr": 1e-3, "epochs": 36, "model": {}},
    "dino": {"lr": 3e-4, "epochs": 36, "clip_grad": 3.0,
             "model": {"teacher_temp": 0.02, "pos_embed": "sincos", "drop_path_rate": 0.0}},
}
