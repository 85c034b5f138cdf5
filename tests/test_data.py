"""sdae_fast.data: streaming folders, per-sample seeded augmentation (exact resume with workers),
the methods' torchvision v2 recipes, DINO crops batched per resolution, bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sdae_fast.data import (AugmentedDataset, BadImageError, ShardedBatchSampler, collate_views, default_workers,
                            dino_views, eval_views, folder_sources, load_splits, make_loader, masked_image_views,
                            model_input, open_sources, sample_seed, train_views)
from sdae_fast.models import build
from sdae_fast.data.sources import IMAGENET_MEAN, IMAGENET_STD, list_image_files
from test_pretrain import _one_thread  # noqa: F401 (autouse: one torch thread, as the loop's micro runs)


def write_folder(root, n=24, size=(20, 24), classes=2, ext="jpg", seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"img{i:05d}.{ext}")
    return root


def _epoch_batches(loader, sampler, epoch, start=0):
    sampler.set_position(epoch, start)
    return [b["images"] for b in loader]


def _same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_resumed_loader_sees_the_same_pixels_with_workers(tmp_path, method):
    """A loader restarted mid-epoch (a killed run resuming) gives the uninterrupted run's batches,
    with 2 workers or none; the caller's global RNG is not touched."""
    train, _ = folder_sources(str(write_folder(tmp_path)), holdout=0.0)
    views = train_views(method, train, 16)
    ds = AugmentedDataset(train, views, seed=5)
    sampler = ShardedBatchSampler(len(ds), 4, seed=5)
    rng = torch.get_rng_state()
    straight = _epoch_batches(make_loader(ds, sampler, workers=2, seed=5), sampler, epoch=1)
    resumed = _epoch_batches(make_loader(ds, sampler, workers=2, seed=5), sampler, epoch=1, start=2)
    in_process = _epoch_batches(make_loader(ds, sampler, workers=0, seed=5), sampler, epoch=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(straight) == 6 and len(resumed) == 4
    assert all(_same(a, b) for a, b in zip(straight[2:], resumed))
    assert all(_same(a, b) for a, b in zip(straight, in_process))
    other_epoch = _epoch_batches(make_loader(ds, sampler, workers=0, seed=5), sampler, epoch=2)
    assert not _same(straight[0], other_epoch[0])


def test_pretrain_stop_and_resume_is_exact_with_workers_on_a_folder(tmp_path):
    from test_pretrain import _stop_and_resume

    folder = write_folder(tmp_path / "imgs", n=40)
    _stop_and_resume(tmp_path, None, "dino", 3, batch_size=8, workers=2, data=str(folder), img_size=16)


def test_sample_seed_mixes_every_argument():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= x < 2 ** 63 for x in seeds)


def _ops(compose):
    return [type(t).__name__ for t in compose.transforms]


def test_masked_image_recipe_is_the_papers():
    (t,) = masked_image_views(224, IMAGENET_MEAN, IMAGENET_STD).transforms
    crop, flip = t.transforms[:2]
    assert _ops(t) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    assert crop.scale == (0.2, 1.0) and crop.interpolation == v2.InterpolationMode.BICUBIC and flip.p == 0.5
    assert tuple(t.transforms[3].mean) == IMAGENET_MEAN
    out = t(torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def _dino_parts(compose):
    parts = {}
    for op in compose.transforms:
        if isinstance(op, v2.RandomApply):
            parts[type(op.transforms[0]).__name__] = (op.p, op.transforms[0])
        else:
            parts[type(op).__name__] = (getattr(op, "p", 1.0), op)
    return parts


def test_dino_multicrop_recipe_is_the_papers():
    views = dino_views(224, 96, 8, IMAGENET_MEAN, IMAGENET_STD)
    assert len(views.transforms) == 10
    blur_p, solarize = [], []
    for v, t in enumerate(views.transforms):
        parts = _dino_parts(t)
        crop = parts["RandomResizedCrop"][1]
        assert tuple(crop.size) == ((224, 224) if v < 2 else (96, 96))
        assert crop.scale == ((0.4, 1.0) if v < 2 else (0.05, 0.4))
        assert crop.interpolation == v2.InterpolationMode.BICUBIC
        assert parts["RandomHorizontalFlip"][0] == 0.5 and parts["RandomGrayscale"][0] == 0.2
        p, jitter = parts["ColorJitter"]
        assert p == 0.8 and jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
        assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
        assert parts["GaussianBlur"][1].sigma == [0.1, 2.0]
        blur_p.append(parts["GaussianBlur"][0])
        solarize.append(parts.get("RandomSolarize", (0.0, None))[0])
    assert blur_p == [1.0, 0.1] + [0.5] * 8 and solarize == [0.0, 0.2] + [0.0] * 8


def test_dino_crops_are_batched_per_resolution_view_major():
    views = dino_views(16, 8, 3, (0.0,), (1.0,), "digits")
    x = torch.rand(1, 24, 24)
    assert [tuple(v.shape) for v in views(x)] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 3
    # collate: view v of sample b lands on row v·B + b of its resolution's tensor
    samples = [([torch.full((1, 4, 4), 10.0 * v + b) if v < 2 else torch.full((1, 2, 2), 10.0 * v + b)
                 for v in range(5)], b, []) for b in range(3)]
    glob, local = collate_views(samples)["images"]
    assert glob.shape == (6, 1, 4, 4) and local.shape == (9, 1, 2, 2)
    assert glob[:, 0, 0, 0].tolist() == [0, 1, 2, 10, 11, 12]
    assert local[:, 0, 0, 0].tolist() == [20, 21, 22, 30, 31, 32, 40, 41, 42]
    single = collate_views([([torch.zeros(1, 4, 4)], 7, ["x"])] * 2)
    assert single["images"].shape == (2, 1, 4, 4) and single["labels"].tolist() == [7, 7]
    assert single["skipped"] == ["x", "x"]


def test_local_crops_of_the_global_size_stay_apart_from_the_globals(tmp_path):
    # main_dino.py: teacher(images[:2]) whatever the crop sizes; collate must not join the two roles.
    views = dino_views(16, 16, 3, (0.0,), (1.0,), "digits")
    assert views.groups == (2, 3)
    samples = [(views(torch.rand(1, 24, 24)), 0, []) for _ in range(4)]
    glob, local = collate_views(samples, views.groups)["images"]
    assert glob.shape == (8, 1, 16, 16) and local.shape == (12, 1, 16, 16)
    assert torch.equal(glob[4], samples[0][0][1]) and torch.equal(local[0], samples[0][0][2])
    (merged,) = collate_views(samples)["images"]  # no roles given: one tensor per size, as before
    assert merged.shape == (20, 1, 16, 16)
    # Through the pretrain loader, with a worker process (the groups reach it in the collate_fn).
    model = build("dino", "micro", img_size=16, local_size=16, num_local=2, out_dim=16)
    train, _ = folder_sources(str(write_folder(tmp_path)), holdout=0.0)
    dataset = AugmentedDataset(train, train_views("dino", train, 16, model), seed=5)
    sampler = ShardedBatchSampler(len(dataset), 3, seed=5)
    batch = next(iter(make_loader(dataset, sampler, workers=1, seed=5)))
    assert [tuple(x.shape) for x in batch["images"]] == [(6, 3, 16, 16), (6, 3, 16, 16)]
    assert [x.shape[0] for x in model_input(model, torch.rand(3, 1, 16, 16))] == [6, 6]
    rows = []
    model.teacher["head"].register_forward_hook(lambda mod, args, out: rows.append(out.shape[0]))
    model(model_input(model, torch.rand(3, 1, 16, 16)))
    assert rows == [6]  # the teacher saw the 2 global crops of the 3 images, not the local crops


def test_digits_recipe_keeps_digits_readable():
    train, held = open_sources(None, 32)
    assert train.profile == "digits" and train.in_chans == 1 and (len(train), len(held)) == (1438, 359)
    (t,) = masked_image_views(32, train.mean, train.std, "digits").transforms
    assert "RandomHorizontalFlip" not in _ops(t) and t.transforms[0].scale == (0.5, 1.0)
    dino = dino_views(32, 16, 2, train.mean, train.std, "digits")
    assert all("RandomGrayscale" not in _ops(c) and "RandomHorizontalFlip" not in _ops(c) for c in dino.transforms)
    out = AugmentedDataset(train, dino)[(0, 3)][0]
    assert [tuple(v.shape) for v in out] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 2


def test_digits_eval_split_is_the_normalised_digits():
    s = load_splits(None, img_size=16)
    assert s.train_images.shape == (1438, 1, 16, 16) and s.heldout_images.shape == (359, 1, 16, 16)
    assert abs(s.train_images.mean().item()) < 1e-4 and abs(s.train_images.std().item() - 1) < 1e-4


def test_folder_eval_split_streams_resize_centre_crop(tmp_path):
    write_folder(tmp_path, n=10, size=(40, 30))
    s = load_splits(str(tmp_path), img_size=16, holdout=0.2, workers=0)
    assert s.train_images.shape == (8, 3, 16, 16) and s.heldout_images.shape == (2, 3, 16, 16)
    assert s.heldout_labels.tolist() == [0, 1]  # files 4 and 9 of the sorted listing and s.classes == ["class0", "class1"]
    assert [type(t).__name__ for t in eval_views(16, IMAGENET_MEAN, IMAGENET_STD).transforms[0].transforms][:2] == \
        ["Resize", "CenterCrop"]


def test_eval_splits_reuse_sources_already_opened(tmp_path, monkeypatch):
    import sdae_fast.data.splits as splits

    write_folder(tmp_path, n=10, size=(40, 30))
    want = load_splits(str(tmp_path), img_size=16, holdout=0.2, workers=0)
    sources = folder_sources(str(tmp_path), 0.2)
    monkeypatch.setattr(splits, "open_sources", lambda *a, **k: pytest.fail("the folder was listed again"))
    got = load_splits(str(tmp_path), img_size=16, holdout=0.2, workers=0, sources=sources)
    assert torch.equal(got.train_images, want.train_images) and torch.equal(got.heldout_labels, want.heldout_labels)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _bad_folder(tmp_path):
    root = write_folder(tmp_path / "bad", n=32)
    good = (root / "class0" / "img00000.jpg").read_bytes()
    (root / "class0" / "img00002.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "class1" / "img00003.jpg").write_text("not an image at all")  # not an image
    return root


def test_undecodable_files_raise_naming_the_file(tmp_path):
    train, _ = folder_sources(str(_bad_folder(tmp_path)), holdout=0.0)
    paths = [train.describe(i) for i in range(len(train))]
    truncated = paths.index(str(tmp_path / "bad" / "class0" / "img00002.jpg"))
    with pytest.raises(BadImageError, match="img00002.jpg.*truncated"):
        AugmentedDataset(train, train_views("mae", train, 16), bad_images="error")[truncated]


def test_bad_files_skip_and_count_in_pretrain(tmp_path, capsys):
    from test_pretrain import _args, standin_build

    from sdae_fast.train.loop import pretrain

    root = _bad_folder(tmp_path)
    res = pretrain(_args(tmp_path, data=str(root), steps=6, batch_size=8, holdout=0.25, workers=1, quiet=False,
                         knn=True), build_fn=standin_build)
    out = capsys.readouterr().out
    assert res["skipped_images"] >= 2 and "img00002.jpg" in out and "img00003.jpg" in out
    assert 0.0 <= res["knn_trained"] <= 1.0  # the final k-NN reads the folder with the same policy
    with pytest.raises(Exception, match="img0000[23].jpg"):  # re-raised from the worker, file named
        pretrain(_args(tmp_path / "e", data=str(root), steps=6, batch_size=8, holdout=0.25, workers=1,
                       bad_images="error"), build_fn=standin_build)
    # A resumed run goes on counting from the checkpoint's count.
    kw = dict(data=str(root), steps=6, batch_size=8, holdout=0.25, workers=1, ckpt_every=3)
    pretrain(_args(tmp_path / "r", stop_after=3, **kw), build_fn=standin_build)
    resumed = pretrain(_args(tmp_path / "r", resume="auto", **kw), build_fn=standin_build)
    assert resumed["skipped_images"] == res["skipped_images"]


def test_a_folder_of_only_bad_files_is_an_error_before_training(tmp_path):
    root = tmp_path / "junk" / "a"
    root.mkdir(parents=True)
    for i in range(20):
        (root / f"{i}.png").write_bytes(b"garbage")
    from test_pretrain import _args, standin_build

    from sdae_fast.train.loop import pretrain

    with pytest.raises(BadImageError, match="unreadable images in a row"):
        pretrain(_args(tmp_path, data=str(tmp_path / "junk"), steps=2, batch_size=4, holdout=0.0),
                 build_fn=standin_build)


def test_empty_folders(tmp_path):
    (tmp_path / "e" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        list_image_files(str(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list_image_files(str(tmp_path / "missing"))


def test_mixed_channel_counts_and_formats_all_decode_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "mixed" / "x"
    d.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (9, 11), dtype=np.uint8)).save(d / "grey.png")
    Image.fromarray(rng.integers(0, 255, (9, 11, 4), dtype=np.uint8)).save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)).save(d / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)).save(d / "rgb.bmp")  # PIL path
    Image.fromarray(rng.integers(0, 255, (9, 11), dtype=np.uint8)).convert("P").save(d / "palette.gif")
    train, _ = folder_sources(str(tmp_path / "mixed"), holdout=0.0)
    assert len(train) == 5
    for i in range(5):
        img = train.load(i)
        assert img.shape == (3, 9, 11) and img.dtype == torch.uint8, train.describe(i)
    batch = collate_views([AugmentedDataset(train, train_views("dino", train, 32))[i] for i in range(5)])
    assert batch["images"][0].shape == (10, 3, 32, 32)


def test_16_bit_pngs_and_animated_gifs_decode_to_rgb_uint8(tmp_path):
    """torchvision decodes a 16-bit PNG as uint16 (DINO's solarise at 128 then failed: no uint16 ">=")
    and an animated GIF as (frames, 3, H, W) (the batch would not stack); both come out as PIL's
    convert("RGB") gives them: 8-bit, frame 0."""
    d = tmp_path / "deep" / "x"
    d.mkdir(parents=True)
    deep = np.arange(9 * 11 * 3, dtype=np.uint16).reshape(9, 11, 3) * 200
    from torchvision.io import write_png

    try:
        write_png(torch.from_numpy(deep).permute(2, 0, 1).contiguous(), str(d / "rgb16.png"))
    except (RuntimeError, TypeError, ValueError):  # a torchvision without 16-bit encoding: PIL's grey I;16
        Image.fromarray(deep[..., 0]).save(d / "rgb16.png")
    frames = [Image.fromarray(np.full((9, 11), v, dtype=np.uint8)).convert("P") for v in (40, 200)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    train, _ = folder_sources(str(tmp_path / "deep"), holdout=0.0)
    for i in range(2):
        img = train.load(i)
        assert img.shape == (3, 9, 11) and img.dtype == torch.uint8, train.describe(i)
    gif = train.load([train.describe(i) for i in range(2)].index(str(d / "anim.gif")))
    with Image.open(d / "anim.gif") as im:
        assert torch.equal(gif, torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
    dataset = AugmentedDataset(train, train_views("dino", train, 32))
    batch = collate_views([dataset[(epoch, i)] for epoch in range(6) for i in range(2)])  # solarise p 0.2
    assert batch["images"][0].shape == (24, 3, 32, 32)


def test_crop_larger_than_the_image_upsamples(tmp_path):
    d = tmp_path / "small" / "x"
    d.mkdir(parents=True)
    Image.fromarray(np.full((5, 7, 3), 100, dtype=np.uint8)).save(d / "tiny.png")
    train, _ = folder_sources(str(tmp_path / "small"), holdout=0.0)
    (view,) = AugmentedDataset(train, train_views("mae", train, 64))[0][0]
    assert view.shape == (3, 64, 64) and torch.isfinite(view).all()
    (ev,) = eval_views(64, train.mean, train.std)(train.load(0))
    assert ev.shape == (3, 64, 64)


def test_default_workers_and_bad_options():
    assert 0 <= default_workers() <= 8 and default_workers(world=10 ** 6) == 0
    with pytest.raises(ValueError, match="bad_images"):
        AugmentedDataset(None, None, bad_images="ignore")
    with pytest.raises(ValueError, match="workers"):
        make_loader([], ShardedBatchSampler(4, 2), workers=-1)
    with pytest.raises(ValueError, match="outside an epoch"):
        ShardedBatchSampler(8, 2).set_position(0, 5)


def test_holdout_is_the_held_out_fraction():
    from sdae_fast.data.sources import digits_sources, held_out_mask

    assert held_out_mask(10, 0.2).nonzero()[0].tolist() == [4, 9]  # every 5th, as before
    assert held_out_mask(12, 0.25).nonzero()[0].tolist() == [3, 7, 11]
    for h in (0.1, 0.4, 0.5, 0.9):
        assert held_out_mask(1000, h).sum() == round(1000 * h), h  # 0.4 and 0.9 held out 50 % before
    assert held_out_mask(7, 0.0).sum() == 0
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"holdout must be a finite float in \[0, 1\)"):
            held_out_mask(10, bad)
        with pytest.raises(ValueError, match="holdout"):
            digits_sources(8, bad)


def test_unreadable_held_out_images_are_named_and_eval_takes_the_policy(tmp_path, capsys):
    from test_pretrain import _args, standin_build

    from sdae_fast.cli import main
    from sdae_fast.train.loop import pretrain

    root = _bad_folder(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"skipped \d unreadable image\(s\) of bad for the evaluation"):
        pretrain(_args(tmp_path, data=str(root), steps=2, batch_size=8, holdout=0.5, workers=0, knn=True,
                       export=True), build_fn=standin_build)
    # sdae-fast eval of a run trained with --bad-images skip reads its data with the run's policy
    real = _args(tmp_path / "real", method="mae", data=str(root), steps=2, batch_size=8, holdout=0.5, workers=0,
                 export=True, knn=False, bad_images="skip")
    pretrain(real, build_fn=None)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert main(["eval", "--checkpoint", real.out, "--no-linear", "--threads", "1"]) == 0
    assert "pretrained" in capsys.readouterr().out
    with pytest.raises(Exception, match=r"img0000[23]\.jpg"):
        main(["eval", "--checkpoint", real.out, "--no-linear", "--threads", "1", "--bad-images", "error"])


def test_linked_folders_inside_a_class_are_followed_once(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    extra = write_folder(tmp_path / "elsewhere", n=3, classes=1) / "class0"
    os.symlink(extra, root / "class1" / "more")  # a linked folder of 3 more class-1 images
    os.symlink(root / "class1", root / "class1" / "loop")  # a link back up: must not walk forever
    train, _ = folder_sources(str(root), holdout=0.0)
    paths = [train.describe(i) for i in range(len(train))]
    assert len(paths) == 8 + 3 and sum("/more/" in p for p in paths) == 3
    assert sorted(train.labels.tolist()) == [0] * 4 + [1] * 7


def test_without_torchvision_decoding_pil_decodes(tmp_path, monkeypatch):
    """torchvision.io's decoding is deprecated since 0.29: where a torchvision has none, PIL decodes
    the same files (PNG: the same pixels) instead of every image counting as bad."""
    from sdae_fast.data import sources

    d = tmp_path / "f" / "x"
    d.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 11, 3), dtype=np.uint8)).save(d / "a.png")
    want = sources.decode_rgb(str(d / "a.png"))
    monkeypatch.setattr(sources, "_torchvision_decoder", lambda: None)
    assert torch.equal(sources.decode_rgb(str(d / "a.png")), want)
