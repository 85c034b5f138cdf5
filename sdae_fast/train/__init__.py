"""``sdae-fast pretrain``: data (``data``), loop (``loop``), optimiser/schedule (``optim``), checkpoints
(``checkpoint``), DDP setup (``distributed``), the demo recipe (``demo_recipe``), timm export (``export``) and
the command line (``cli``). Nothing here is imported by ``import sdae_fast``."""
