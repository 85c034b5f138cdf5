"""Linear probe: multinomial logistic regression on frozen features, top-1 on the held-out split.

The recipe, fixed so every number in a table means the same thing:

1. standardise each feature dimension with the train split's mean and std (``StandardScaler``);
2. scikit-learn's ``LogisticRegressionCV``: L2 penalty, lbfgs, inverse regularisation ``C`` chosen
   from ``CS`` by stratified ``FOLDS``-fold cross-validation on the train split (accuracy), then
   refit on the whole train split;
3. top-1 accuracy on the held-out split.

A train split too small for the folds (a class with fewer than ``FOLDS`` images) falls back to
``C = 1`` without cross-validation. Deterministic: no shuffling, lbfgs has no randomness.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .features import check_finite

CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
FOLDS = 3
MAX_ITER = 300  # lbfgs iterations per fit; the CV path warm-starts each C from the previous one


def linear_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                          test_labels: torch.Tensor, cs=CS, folds: int = FOLDS) -> float:
    """Top-1 held-out accuracy of the recipe above."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
        from sklearn.model_selection import StratifiedKFold
        from sklearn.preprocessing import StandardScaler
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    except ImportError as exc:
        raise ImportError("the linear probe needs scikit-learn: pip install 'sdae_fast[data]'") from exc
    check_finite(train_feats, "train", "linear probe")
    check_finite(test_feats, "test", "linear probe")
    x_train = train_feats.double().numpy()
    x_test = test_feats.double().numpy()
    y_train, y_test = train_labels.numpy(), test_labels.numpy()
    if len(x_test) == 0 or len(np.unique(y_train)) < 2:
        raise ValueError(f"the linear probe needs a held-out split and >= 2 train classes; got "
                         f"{len(x_test)} held-out images, classes {np.unique(y_train).tolist()}")
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    smallest_class = min(np.unique(y_train, return_counts=True)[1])
    # BLAS threads as many as torch's (--threads): OpenBLAS's own default spin-waits badly on a busy CPU.
    with warnings.catch_warnings(), threadpool_limits(limits=torch.get_num_threads()):
        # The weakest regularisation may stop at MAX_ITER; its CV score then decides as it is.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # scikit-learn 1.8 announces renamed LogisticRegressionCV options; the defaults used here stay.
        warnings.simplefilter("ignore", FutureWarning)
        if smallest_class >= folds:
            clf = LogisticRegressionCV(Cs=list(cs), cv=StratifiedKFold(folds), max_iter=MAX_ITER,
                                       scoring="accuracy")
        else:
            clf = LogisticRegression(C=1.0, max_iter=MAX_ITER)
        clf.fit(x_train, y_train)
    return float((clf.predict(x_test) == y_test).mean())
