"""``sdae-fast pretrain``: loop (``loop``; data from ``sdae_fast.data``), step logging and progress bar
(``progress``), optimiser/schedule (``optim``), checkpoints (``checkpoint``), DDP setup
(``distributed``), k-NN evaluation (``knn``), timm export (``export``) and the command line (``cli``).
Nothing here is imported by ``import sdae_fast``."""
