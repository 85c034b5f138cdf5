"""Evaluation (``sdae_fast.eval``): k-NN vote against a float64 hand reference, the linear-probe
recipe, pooled features, the table, checkpoint / exported-encoder loading and ``sdae-fast eval``."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sdae_fast.eval.features import encoder_features, pixel_features
from sdae_fast.eval.knn import knn_accuracy
from sdae_fast.eval.linear_probe import linear_probe_accuracy
from sdae_fast.eval.report import evaluate, flat, format_table
from test_pretrain import _one_thread  # noqa: F401  (autouse: one torch thread on the shared CPU)




def _knn_by_hand(bank, bank_y, query, k, t):
    """One query, float64, plain Python: cosine similarities, top k, sum of exp(sim / T) per class."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    q = unit(query)
    sims = sorted(((sum(a * b for a, b in zip(q, unit(row))), y) for row, y in zip(bank, bank_y)), reverse=True)
    votes = {}
    for s, y in sims[:k]:
        votes[y] = votes.get(y, 0.0) + math.exp(s / t)
    return max(votes, key=votes.get)


@pytest.mark.parametrize("k,t", [(1, 0.07), (5, 0.07), (7, 1.0), (50, 0.5)])
def test_knn_matches_hand_reference(k, t):
    g = torch.Generator().manual_seed(k)
    bank, bank_y = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    query, query_y = torch.randn(13, 6, generator=g), torch.randint(0, 4, (13,), generator=g)
    want = [_knn_by_hand(bank.double().tolist(), bank_y.tolist(), q, k, t) for q in query.double().tolist()]
    expected = sum(int(p == y) for p, y in zip(want, query_y.tolist())) / len(query_y)
    assert knn_accuracy(bank, bank_y, query, query_y, k=k, temperature=t, num_classes=4, chunk=5) == expected


def test_knn_rejects_bad_settings():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="k >= 1"):
        knn_accuracy(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="temperature > 0"):
        knn_accuracy(x, y, x, y, temperature=0.0)


def _blobs(n_per_class, dim, classes, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_linear_probe_separates_blobs_and_is_chance_on_noise():
    x, y = _blobs(30, 8, 3, 0.3, 0)
    xt, yt = _blobs(10, 8, 3, 0.3, 0)
    assert linear_probe_accuracy(x, y, xt, yt) == 1.0
    g = torch.Generator().manual_seed(1)
    noise, noise_t = torch.randn(300, 20, generator=g), torch.randn(300, 20, generator=g)
    labels, labels_t = torch.randint(0, 2, (300,), generator=g), torch.randint(0, 2, (300,), generator=g)
    assert 0.35 < linear_probe_accuracy(noise, labels, noise_t, labels_t) < 0.65


def test_linear_probe_small_split_and_bad_input():
    x, y = _blobs(2, 4, 2, 0.1, 3)  # 2 per class < 3 folds: the fixed C = 1 fallback
    assert linear_probe_accuracy(x, y, x, y) == 1.0
    with pytest.raises(ValueError, match=">= 2 train classes"):
        linear_probe_accuracy(x, torch.zeros_like(y), x, y)


def test_features_pool_cls_and_mean():
    from sdae_fast.models import build

    enc = build("mae", "micro").encoder
    enc.train()
    x = torch.randn(5, 1, 32, 32)
    cls = encoder_features(enc, x, pool="cls", batch_size=2)
    mean = encoder_features(enc, x, pool="mean", batch_size=3)
    assert enc.training  # restored
    with torch.no_grad():
        tokens = enc.eval().forward_features(x)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(mean, tokens[:, 1:].mean(1))
    assert pixel_features(x).shape == (5, 1024)
    with pytest.raises(ValueError, match="pool must be one of"):
        encoder_features(enc, x, pool="max")


class _Splits:
    def __init__(self, seed):
        self.train_images, self.train_labels = _blobs(20, 16, 3, 0.5, seed)
        self.heldout_images, self.heldout_labels = _blobs(5, 16, 3, 0.5, seed)
        self.train_images = self.train_images.view(-1, 1, 4, 4)
        self.heldout_images = self.heldout_images.view(-1, 1, 4, 4)
        self.classes, self.name = ["a", "b", "c"], "blobs"


def test_evaluate_table_and_flat_keys():
    splits = _Splits(0)
    ident = torch.nn.Sequential(torch.nn.Flatten())
    ident.embed = ident.forward
    ident.register_parameter("dummy", torch.nn.Parameter(torch.zeros(1)))
    res = evaluate({"pretrained": ident, "random init": ident, "raw pixels": None}, splits, k=5)
    assert res["pretrained"] == res["raw pixels"] == {"knn": 1.0, "linear": 1.0}
    table = format_table(res, 5, 0.07, "cls", 15, "blobs")
    assert "raw pixels" in table and "vs random init: knn +0.0 pts, linear +0.0 pts" in table
    assert flat(res)["linear_random_init"] == 1.0 and flat(res)["knn_raw_pixels"] == 1.0


def test_plots_write_pngs(tmp_path):
    from sdae_fast.plots import pretrain_figure, speedup_chart

    res = {"pretrained": {"knn": 0.9, "linear": 0.95}, "random init": {"knn": 0.7, "linear": None}}
    for path in (pretrain_figure([3.0 - 0.01 * i for i in range(50)], res, str(tmp_path / "a" / "p.png")),
                 speedup_chart(["x", "y"], [2.5, 0.8], str(tmp_path / "s.png"))):
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _short_run(tmp_path, method):
    from sdae_fast.train.cli import make_args, run_pretrain

    args = make_args(method=method, steps=4, batch_size=16, ckpt_every=4, out=str(tmp_path / "run"),
                     quiet=True, knn=False, threads=1)
    return args, run_pretrain(args)


@pytest.mark.parametrize("method", ["mae", "mixedae", "dino"])  # MixedAE: dense attention, as the export
def test_eval_cli_on_checkpoint_and_export(tmp_path, capsys, method):
    from sdae_fast.cli import main
    from sdae_fast.eval.load import load_encoder

    args, res = _short_run(tmp_path, method)
    from sdae_fast.train.checkpoint import checkpoint_path

    ckpt = checkpoint_path(str(tmp_path / "run"), 4)
    x = torch.randn(3, 1, 32, 32)
    from sdae_fast.models import evaluated_encoder

    want = encoder_features(evaluated_encoder(res["model"]), x)  # DINO: the teacher's, the others: the student
    for path in (ckpt, tmp_path / "run", tmp_path / "run" / "encoder.pt"):
        loaded = load_encoder(str(path))
        torch.testing.assert_close(encoder_features(loaded.encoder, x), want, rtol=1e-5, atol=1e-5)
    out_json = tmp_path / "e.json"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # a micro run evaluates with one thread, as it pretrained (the same rule: sdae_fast.threads)
        assert main(["eval", "--checkpoint", str(ckpt), "--no-linear", "--json", str(out_json)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    assert "pretrained" in printed and "random init" in printed and "raw pixels" in printed
    assert set(json.load(open(out_json))) == {"knn_trained", "knn_random_init", "knn_raw_pixels"}


def test_eval_cli_errors(tmp_path):
    from sdae_fast.cli import main

    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["eval", "--checkpoint", str(tmp_path / "nowhere.pt")])
    with pytest.raises(IsADirectoryError, match="without encoder.pt"):
        main(["eval", "--checkpoint", str(tmp_path)])


def test_bench_speedup_chart(tmp_path):
    from sdae_fast.bench.harness import Case, Measurement
    from sdae_fast.bench.report import speedups, write_speedup_chart

    def m(variant, ms, error=None):
        return Measurement(Case("ema", "B=4", variant, make=lambda: None), times_ms=[ms] if ms else [], error=error)

    ms = [m("naive", 4.0), m("fused", 1.0), m("compile", 8.0), m("broken", None, error="boom")]
    assert speedups(ms) == [("ema B=4 fused", 4.0), ("ema B=4 compile", 0.5)]
    env = {"cpu": "x86", "date": "2026-12-01T00:00:00"}
    assert write_speedup_chart(ms, env, tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 0
    assert not write_speedup_chart(ms[1:], env, tmp_path / "none.png")  # no naive baseline: no chart


def test_evaluated_encoder_is_what_each_official_evaluation_reads():
    """DINO's eval_knn.py / eval_linear.py read the teacher (--checkpoint_key teacher); MAE's and SdAE's
    main_linprobe.py the student (checkpoint['model'], --model_mode model); MixedAE follows MAE, with
    dense attention (a copy of the student, as its timm export)."""
    from torch import nn

    from sdae_fast.models import build, evaluated_encoder
    from sdae_fast.models.topk_attention import TopKAttention

    for method in ("mae", "sdae", "dino"):
        model = build(method, "micro")
        want = model.teacher["encoder"] if method == "dino" else model.encoder
        assert evaluated_encoder(model) is want, method
    model = build("mixedae", "micro")
    dense = evaluated_encoder(model)
    assert dense is not model.encoder and dense.state_dict().keys() == model.encoder.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), model.encoder.state_dict().values()))
    tops = [m.topk for m in model.encoder.modules() if isinstance(m, TopKAttention)]
    assert tops and all(t is not None for t in tops)  # the student keeps its homologous attention
    assert all(m.topk is None for m in dense.modules() if isinstance(m, TopKAttention))
    assert model.encoder.config["topk"] is not None and dense.config["topk"] is None
    assert all(m.topk is None for m in dense.fresh().modules() if isinstance(m, TopKAttention))  # its twin too
    own = nn.Module()  # a caller's build_fn model without the attribute: its encoder
    own.encoder = nn.Linear(2, 2)
    assert evaluated_encoder(own) is own.encoder


def test_cpu_threads_rule():
    from sdae_fast.threads import apply_cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert apply_cpu_threads(None, "base", torch.device("cpu")) is None and torch.get_num_threads() == 2
        assert apply_cpu_threads(None, None, torch.device("cpu")) is None  # an exported encoder of unknown size
        assert apply_cpu_threads(None, "micro", torch.device("cuda")) is None and torch.get_num_threads() == 2
        assert apply_cpu_threads(None, "micro", torch.device("cpu")) == 1 and torch.get_num_threads() == 1
        assert apply_cpu_threads(2, "micro", torch.device("cpu")) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_evaluation_streams_features_not_images(tmp_path, monkeypatch):
    """The end of pretraining and ``sdae-fast eval`` stream each split once and keep the features
    (N x D), never the images (a 224 px image is 600 KB: ImageNet's would not fit): the numbers are
    those of the in-memory path, and the raw pixels are area-averaged to at most 1024 values."""
    from sdae_fast.data import load_splits, open_sources, splits as data_splits
    from sdae_fast.eval.features import PIXEL_VALUES
    from sdae_fast.eval.report import evaluate_sources
    from sdae_fast.models import build
    from test_data import write_folder

    write_folder(tmp_path / "imgs", n=30, size=(40, 36), classes=3)
    train_src, held_src = open_sources(str(tmp_path / "imgs"), 32, 0.3)
    encoder = build("mae", "micro", in_chans=3).encoder
    encoders = {"pretrained": encoder, "raw pixels": None}
    in_memory = evaluate(encoders, load_splits(str(tmp_path / "imgs"), 32, 0.3, workers=0), k=5)
    monkeypatch.setattr(data_splits, "materialize", lambda *a, **k: pytest.fail("the images were materialised"))
    streamed = evaluate_sources(encoders, train_src, held_src, 32, k=5, workers=1)
    assert streamed == in_memory
    assert pixel_features(torch.zeros(2, 3, 224, 224)).shape == (2, 3 * 18 * 18)
    assert pixel_features(torch.zeros(2, 1, 32, 32)).shape == (2, PIXEL_VALUES)  # the digits as they are
    from sdae_fast.cli import main
    from sdae_fast.train.cli import make_args, run_pretrain

    res = run_pretrain(make_args(method="mae", recipe="demo", data=str(tmp_path / "imgs"), holdout=0.3, img_size=32, steps=2,
                                 batch_size=8, out=str(tmp_path / "run"), ckpt_every=0, quiet=True, workers=0))
    assert 0.0 <= res["knn_trained"] <= 1.0 and (tmp_path / "run" / "encoder.pt").exists()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--no-linear", "--threads", "1"]) == 0
