"""The README's main command visibly learns (issue 9 §4): ``sdae-fast pretrain --method sdae`` with
the demo recipe's defaults beats the same architecture at random init by >= 5 k-NN points and
>= 3 linear-probe points on the held-out digits. A few minutes on 2 CPU cores: marked slow."""
from __future__ import annotations

import pytest

GOAL_KNN, GOAL_LINEAR = 0.05, 0.03


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sdae"])
def test_demo_beats_random_init(tmp_path, method):
    from sdae_fast.train.cli import make_args, run_pretrain

    res = run_pretrain(make_args(method=method, out=str(tmp_path / "run"), threads=1, ckpt_every=0, export=False,
                                 quiet=True))
    assert res["knn_trained"] >= res["knn_random_init"] + GOAL_KNN, res
    assert res["linear_trained"] >= res["linear_random_init"] + GOAL_LINEAR, res
    assert (tmp_path / "run" / "pretrain.png").exists()
