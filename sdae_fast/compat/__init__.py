"""Drop-in swaps for existing training code (README "Drop into existing code").

Each module mirrors one public API and computes the same numbers with sdae_fast's fused ops:

* :mod:`.dino` — ``DINOLoss``, facebookresearch/dino ``main_dino.DINOLoss``;
* :mod:`.mae` — ``patch(model)`` / ``unpatch(model)`` on one instance of facebookresearch/mae
  ``models_mae.MaskedAutoencoderViT`` (or SdAE's student copy of it);
* :mod:`.sdae` — ``EMA_process`` / ``weight_delivery`` of AbrahamYabo/SdAE ``engine_pretrain``;
* :mod:`.timm` — ``ModelEmaV3``, timm's ``timm.utils.ModelEmaV3``;
* :mod:`.lightly` — ``update_momentum``, lightly's ``lightly.models.utils.update_momentum``.

Nothing is imported or patched at import time; each swap touches only what it is given.
"""
