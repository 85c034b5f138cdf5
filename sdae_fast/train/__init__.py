"""``sdae-fast pretrain``: loop (``loop``; data from ``sdae_fast.data``, evaluation from
``sdae_fast.eval``), step logging and progress bar (``progress``), recipes (``recipes``, the digits'
tuned values in ``demo_recipe``), optimiser/schedule (``optim``), checkpoints (``checkpoint``), DDP
setup (``distributed``), timm export (``export``) and the command line (``cli``). Nothing here is
imported by ``import sdae_fast``."""
