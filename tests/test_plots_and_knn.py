"""User-facing edges of the evaluation and the figures: ``pretrain.png``'s step axis after a resume,
k-NN and linear probe on non-finite features or out-of-range labels, and ``--quiet``."""
from __future__ import annotations

import pytest
import torch

from sdae_fast.eval.knn import knn_accuracy
from sdae_fast.eval.linear_probe import linear_probe_accuracy
from test_pretrain import _one_thread  # noqa: F401  (autouse: one torch thread on the shared CPU)

pytest.importorskip("matplotlib")

RESULTS = {"pretrained": {"knn": 0.9, "linear": 0.95}, "raw pixels": {"knn": 0.5, "linear": None}}


@pytest.fixture
def loss_axes(monkeypatch):
    """What the loss axis of each figure ``sdae_fast.plots`` saves shows: ``{"lines": [x data of each
    line], "ticks": [x ticks inside the view]}``, read after drawing."""
    from sdae_fast import plots

    seen = []
    real_save = plots._save

    def keep(fig, plt, path):
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        seen.append({"lines": [list(line.get_xdata()) for line in ax.lines],
                     "ticks": [t for t in ax.get_xticks() if lo <= t <= hi]})
        return real_save(fig, plt, path)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def test_pretrain_figure_numbers_resumed_steps_truly(tmp_path, loss_axes):
    from sdae_fast.plots import pretrain_figure

    losses = [1.0 / (i + 1) for i in range(30)]  # steps 71..100 of a run resumed from step 70
    path = pretrain_figure(losses, RESULTS, str(tmp_path / "p.png"), first_step=71)
    assert (tmp_path / "p.png").stat().st_size > 0 and path.endswith("p.png")
    raw, smooth = loss_axes[0]["lines"]
    assert raw == list(range(71, 101))
    assert smooth == list(range(90, 101))  # each 20-step mean sits at its last step
    pretrain_figure(losses, RESULTS, str(tmp_path / "q.png"))  # default: a run from step 1
    assert loss_axes[1]["lines"] == [list(range(1, 31)), list(range(20, 31))]


@pytest.mark.parametrize("n,first", [(3, None), (4, 7), (2, 11)])
def test_pretrain_figure_step_ticks_are_integers(tmp_path, loss_axes, n, first):
    from sdae_fast.plots import pretrain_figure

    kw = {} if first is None else {"first_step": first}
    pretrain_figure([2.0, 1.5, 1.2, 1.1][:n], RESULTS, str(tmp_path / "p.png"), **kw)
    ticks = loss_axes[0]["ticks"]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 8, generator=g), torch.arange(30) % 3
    return x, y, x[:9] + 0.01 * torch.randn(9, 8, generator=g), y[:9]


@pytest.mark.parametrize("evaluation", [knn_accuracy, linear_probe_accuracy], ids=["knn", "linear"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_named(evaluation, bad):
    x, y, xt, yt = _data()
    x_bad = x.clone()
    x_bad[[0, 4], 1] = bad
    with pytest.raises(ValueError, match=r"train features .*(NaN|inf).* 2 of 30 rows.*diverged"):
        evaluation(x_bad, y, xt, yt)
    xt_bad = xt.clone()
    xt_bad[3, 0] = bad
    with pytest.raises(ValueError, match=r"test features .*(NaN|inf).* 1 of 9 rows.*diverged"):
        evaluation(x, y, xt_bad, yt)
    assert 0.0 <= evaluation(x, y, xt, yt) <= 1.0  # finite features still evaluate
    with pytest.raises(ValueError, match="non-empty|held-out split"):  # the check passes an empty split on
        evaluation(x, y, xt[:0], yt[:0])


def test_knn_nan_message_names_nan_and_bf16_is_checked():
    x, y, xt, yt = _data()
    x_bad = x.bfloat16()
    x_bad[5] = float("nan")
    with pytest.raises(ValueError, match=r"train features contain NaN in 1 of 30 rows"):
        knn_accuracy(x_bad, y, xt.bfloat16(), yt)


def test_knn_labels_outside_num_classes_are_an_error():
    x, y, xt, yt = _data()
    with pytest.raises(ValueError, match=r"train labels .*\[0, 3\).*5"):
        knn_accuracy(x, torch.tensor([0, 1, 5])[y], xt, yt, num_classes=3)
    with pytest.raises(ValueError, match=r"test labels .*\[0, 3\).*4"):
        knn_accuracy(x, y, xt, yt + 2, num_classes=3)
    with pytest.raises(ValueError, match=r"train labels .*negative.*-1"):
        knn_accuracy(x, y - 1, xt, yt)
    with pytest.raises(ValueError, match=r"test labels .*negative.*-1"):
        knn_accuracy(x, y, xt, yt - 1, num_classes=3)
    assert knn_accuracy(x, y, xt, yt, num_classes=3) == knn_accuracy(x, y, xt, yt) == 1.0
    assert knn_accuracy(x, y, xt, yt, num_classes=7) == 1.0  # unused classes are fine


@pytest.mark.parametrize("quiet", [True, False])
def test_pretrain_quiet_prints_no_recipe_line(tmp_path, monkeypatch, capsys, quiet):
    import sdae_fast.train.cli as train_cli
    from sdae_fast.cli import main

    ran = []
    monkeypatch.setattr(train_cli, "run_pretrain", lambda args: ran.append(args))  # no training here
    argv = ["pretrain", "--method", "sdae", "--out", str(tmp_path)] + (["--quiet"] if quiet else [])
    assert main(argv) == 0 and len(ran) == 1
    out = capsys.readouterr().out
    assert out == "" if quiet else out.startswith("recipe: demo (the default without --data)")
