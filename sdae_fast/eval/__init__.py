"""Evaluation of frozen encoders: k-NN (DINO's weighted vote) and a linear probe, against the same
architecture at random init and the raw pixels (``sdae-fast eval`` and the end of pretraining)."""
from .features import encoder_features, pixel_features
from .knn import knn_accuracy
from .linear_probe import linear_probe_accuracy
from .report import evaluate, format_table

__all__ = ["encoder_features", "pixel_features", "knn_accuracy", "linear_probe_accuracy", "evaluate",
           "format_table"]
