"""The demo recipe (``train/demo_recipe.py``) fills the pretrain options left unset, and its model
options reach ``build`` for micro runs only."""
from __future__ import annotations

from sdae_fast.train.cli import make_args
from sdae_fast.train.demo_recipe import DEMO


def test_demo_fills_unset_options_and_explicit_ones_win():
    for method, entry in DEMO.items():
        args = make_args(method=method)
        assert args.lr == entry["lr"] and args.epochs == entry["epochs"]
        assert args.model_kw == entry["model"]
        for key, value in entry.items():
            if key != "model":
                assert getattr(args, key) == value
    args = make_args(method="dino", lr=1.5e-3, epochs=2, model_kw={"out_dim": 32})
    assert (args.lr, args.epochs) == (1.5e-3, 2) and args.model_kw == {**DEMO["dino"]["model"], "out_dim": 32}
    assert make_args(method="dino", size="tiny").model_kw == {}  # tuned for micro only


def test_demo_model_options_reach_the_model(tmp_path):
    from sdae_fast.train.cli import run_pretrain

    args = make_args(method="dino", steps=1, batch_size=8, out=str(tmp_path), quiet=True, knn=False,
                     export=False, ckpt_every=0, threads=1, model_kw={"out_dim": 48})
    assert run_pretrain(args)["model"].center.shape == (1, 48)
