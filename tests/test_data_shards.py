"""sdae_fast.data.shards: WebDataset tar shards as a random-access source. Shards are written with
webdataset's own ShardWriter/TarWriter and the index is checked against webdataset's own reader;
decoding, held-out split, worker exactness, bad members, errors, the CLI end to end, and an index
that holds no Python object per sample."""
from __future__ import annotations

import gc
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from sdae_fast.data import (AugmentedDataset, BadImageError, ShardedBatchSampler, ShardSource, make_loader,
                            open_sources, shard_sources, train_views)
from sdae_fast.data.shards import is_shard_spec, open_shards
from test_data import _epoch_batches, _same
from test_pretrain import _one_thread  # noqa: F401 (autouse: one torch thread, as the loop's micro runs)

wds = pytest.importorskip("webdataset")
N, CLASSES, PER_SHARD = 50, 3, 20  # 3 shards: 20 + 20 + 10


def encoded(rng, ext, size=(20, 24)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format=
                                                                             "JPEG" if ext == "jpg" else "PNG")
    return buf.getvalue()


def write_shards(root, n=N, per_shard=PER_SHARD, seed=0):
    """``n`` samples (JPEG and PNG alternating, label i % CLASSES) in shards ``train-%06d.tar``;
    returns the pattern and the samples as written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            ext = "jpg" if i % 2 else "png"
            sample = {"__key__": f"s{i:05d}", ext: encoded(rng, ext), "cls": str(i % CLASSES)}
            sink.write(sample)
            samples.append(sample)
    last = (n - 1) // per_shard
    return str(root / f"train-{{000000..{last:06d}}}.tar"), samples


def _image(sample):
    return next(v for k, v in sample.items() if k in ("jpg", "png"))


def test_index_decodes_the_written_images_grouped_as_webdataset_does(tmp_path):
    pattern, samples = write_shards(tmp_path / "shards")
    src = open_shards(pattern)
    assert isinstance(src, ShardSource) and len(src) == N and len(src.shards) == 3
    assert src.labels.tolist() == [i % CLASSES for i in range(N)] and src.classes == ["0", "1", "2"]
    assert src.name == "train-{000000..000002}" and (src.in_chans, src.profile) == (3, "photo")
    theirs = list(wds.WebDataset(pattern, shardshuffle=False))  # webdataset's own reader
    assert [s["__key__"] for s in theirs] == [s["__key__"] for s in samples]
    for i, (sample, their) in enumerate(zip(samples, theirs)):
        ext = "jpg" if "jpg" in sample else "png"
        assert src.describe(i) == f"{their['__url__']}:{sample['__key__']}.{ext}"
        assert src.read(i) == _image(their) == _image(sample)
        want = decode_image(torch.frombuffer(bytearray(_image(sample)), dtype=torch.uint8), ImageReadMode.RGB)
        assert torch.equal(src.load(i), want), src.describe(i)
    assert sorted(src._files) == [0, 1, 2]  # one open file per shard, in this process
    # the other spellings of the same shards: one .tar, and a folder of them
    assert len(open_shards(str(tmp_path / "shards" / "train-000002.tar"))) == N - 2 * PER_SHARD
    folder = open_shards(str(tmp_path / "shards"))
    assert folder.name == "shards" and [folder.describe(i) for i in range(N)] == [src.describe(i) for i in range(N)]


def test_policies_no_label_metadata_only_samples_long_names_and_directories(tmp_path):
    rng = np.random.default_rng(1)
    long_key = "dir/" + "k" * 120  # > 100 characters: tarfile writes a pax header
    path = tmp_path / "odd.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "a", "jpeg": encoded(rng, "jpg"), "cls": "2"})
        sink.write({"__key__": "b", "PNG": encoded(rng, "png")})  # no label: 0; any case
        sink.write({"__key__": "meta", "json": b"{}"})  # no image: ignored
        sink.write({"__key__": long_key, "png": encoded(rng, "png"), "cls": 1})
    src = open_shards(str(path))
    assert len(src) == 3 and src.labels.tolist() == [2, 0, 1] and src.classes == ["0", "1", "2"]
    assert src.describe(1).endswith("odd.tar:b.PNG") and src.describe(2).endswith(f":{long_key}.png")
    assert all(src.load(i).shape == (3, 20, 24) for i in range(3))


def test_at_most_max_open_shards_files_stay_open(tmp_path, monkeypatch):
    monkeypatch.setattr("sdae_fast.data.shards.MAX_OPEN_SHARDS", 2)
    src = open_shards(write_shards(tmp_path / "shards")[0])
    first = [src.load(i) for i in range(N)]
    assert sorted(src._files) == [1, 2]  # the least recently used shard was closed
    assert all(torch.equal(a, src.load(i)) for i, a in enumerate(first))  # and reopened when needed


def test_held_out_split_is_the_folders_rule(tmp_path):
    pattern, _ = write_shards(tmp_path / "shards")
    full = open_shards(pattern)
    train, held = shard_sources(pattern, holdout=0.2)
    every_fifth = [full.describe(i) for i in range(4, N, 5)]
    assert [held.describe(i) for i in range(len(held))] == every_fifth
    assert len(train) + len(held) == N and held.labels.tolist() == full.labels[4::5].tolist()
    assert not set(every_fifth) & {train.describe(i) for i in range(len(train))}
    assert torch.equal(held.load(3), full.load(19))
    t2, h2 = open_sources(pattern, holdout=0.2)  # the dispatch
    assert type(t2) is ShardSource and len(h2) == len(held)


def test_workers_see_the_same_pixels_as_the_main_process(tmp_path):
    """Each worker opens its own shard files after the fork; batches (and a mid-epoch restart) are
    the same as decoding in the main process, which has its files open already."""
    train, _ = shard_sources(write_shards(tmp_path / "shards")[0], holdout=0.0)
    ds = AugmentedDataset(train, train_views("mae", train, 16), seed=3)
    sampler = ShardedBatchSampler(len(ds), 8, seed=3)
    in_process = _epoch_batches(make_loader(ds, sampler, workers=0, seed=3), sampler, epoch=1)
    workers = _epoch_batches(make_loader(ds, sampler, workers=2, seed=3), sampler, epoch=1)
    resumed = _epoch_batches(make_loader(ds, sampler, workers=2, seed=3), sampler, epoch=1, start=2)
    assert len(in_process) == 6 and all(_same(a, b) for a, b in zip(in_process, workers))
    assert all(_same(a, b) for a, b in zip(in_process[2:], resumed))


def _bad_shard(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(6):
            data = encoded(rng, "jpg")
            sink.write({"__key__": f"k{i}", "jpg": data[: len(data) // 2] if i == 3 else data, "cls": i % 2})
    return str(path)


def test_a_bad_member_is_skipped_and_counted_or_raises_naming_shard_and_key(tmp_path):
    src = open_shards(_bad_shard(tmp_path))
    views = train_views("mae", src, 16)
    with pytest.raises(BadImageError, match=r"bad\.tar:k3\.jpg"):
        AugmentedDataset(src, views, bad_images="error")[3]
    skip = AugmentedDataset(src, views, bad_images="skip")
    _, label, skipped = skip[3]
    assert skipped == [src.describe(3)] and label == src.labels[4]  # the next sample stands in
    assert sum(len(skip[i][2]) for i in range(len(src))) == 1


def test_clear_errors_naming_the_data_value(tmp_path):
    pattern, _ = write_shards(tmp_path / "shards")
    with pytest.raises(FileNotFoundError, match="missing.tar.*no such file"):
        open_sources(str(tmp_path / "missing.tar"))
    nothing = str(tmp_path / "none-{000..003}.tar")
    with pytest.raises(FileNotFoundError, match=r"none-\{000\.\.003\}\.tar.*none of its 4 shards"):
        open_sources(nothing)
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards do not exist.*train-000003\.tar"):
        open_sources(pattern.replace("000002", "000003"))
    no_images = tmp_path / "text.tar"
    with wds.TarWriter(str(no_images)) as sink:
        sink.write({"__key__": "a", "txt": "hello", "cls": 1})
    with pytest.raises(ValueError, match="text.tar.*hold no images"):
        open_sources(str(no_images))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="junk.tar.*not an uncompressed tar"):
        open_sources(str(tmp_path / "junk.tar"))
    whole = (tmp_path / "shards" / "train-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2 + 100])  # a copy cut short
    with pytest.raises(ValueError, match="cut.tar.*or is truncated"):
        open_sources(str(tmp_path / "cut.tar"))
    bad_label = tmp_path / "label.tar"
    with wds.TarWriter(str(bad_label)) as sink:
        sink.write({"__key__": "a", "png": encoded(np.random.default_rng(0), "png"), "cls": "cat"})
    with pytest.raises(ValueError, match="label.tar:a.cls is not a class label"):
        open_sources(str(bad_label))
    # a folder with images or class subfolders stays an image folder
    assert is_shard_spec(str(tmp_path / "shards")) and not is_shard_spec(str(tmp_path))
    with pytest.raises(ValueError, match="a folder of shards must hold"):
        open_shards(str(tmp_path))


def test_pretrain_and_eval_cli_on_a_shard_pattern(tmp_path):
    from sdae_fast.cli import main

    pattern, _ = write_shards(tmp_path / "shards")
    out = tmp_path / "run"
    assert main(["pretrain", "--method", "mae", "--data", pattern, "--img-size", "32", "--size", "micro",
                 "--steps", "3", "--batch-size", "8", "--no-export", "--no-eval", "--threads", "1",
                 "--workers", "0", "--quiet", "--out", str(out)]) == 0
    from sdae_fast.train.checkpoint import list_checkpoints

    (_, ckpt), = list_checkpoints(str(out))[-1:]
    assert main(["eval", "--checkpoint", ckpt, "--data", pattern, "--no-linear", "--json",
                 str(tmp_path / "e.json")]) == 0


def test_pretrain_stop_and_resume_is_exact_with_workers_on_shards(tmp_path):
    from test_pretrain import _stop_and_resume, standin_build

    pattern, _ = write_shards(tmp_path / "shards")
    _stop_and_resume(tmp_path, standin_build, "mae", 3, batch_size=8, workers=2, data=pattern, img_size=16)


def _fake_shard(path, n):
    """``n`` samples of one tiny PNG each (no labels), written with tarfile: cheap at 20,000."""
    png = encoded(np.random.default_rng(0), "png", size=(2, 2))
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    return str(path)


def _python_objects(root) -> int:
    """Distinct Python objects reachable from ``root`` (a numpy array's buffer is not one)."""
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return len(seen)


def test_the_index_holds_no_python_object_per_sample(tmp_path):
    small, large = (open_shards(_fake_shard(tmp_path / f"{n}.tar", n)) for n in (200, 20_000))
    assert len(large) == 20_000 and large.labels.dtype == np.int64 and not large.labels.any()
    train, held = large.subset(np.arange(20_000) % 5 != 4), large.subset(np.arange(20_000) % 5 == 4)
    assert _python_objects(large) == _python_objects(train) == _python_objects(held) == _python_objects(small)
    arrays = [v for v in vars(large).values() if isinstance(v, np.ndarray)]  # (vars() makes a __dict__)
    assert sum(a.size for a in arrays) >= 2 * 20_000 and all(a.dtype != object for a in arrays)
    assert len(pickle.dumps(large)) < 64 * 20_000  # what a spawned worker receives: ~45 B a sample
    large.load(19_999)
    clone = pickle.loads(pickle.dumps(large))  # open files are not pickled; the clone opens its own
    assert not clone._files and torch.equal(clone.load(19_999), large.load(19_999))


def test_the_index_cache_is_reused_while_a_shard_is_unchanged_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    from sdae_fast.data import shard_index

    monkeypatch.setenv(shard_index.CACHE_ENV, str(tmp_path / "cache"))
    pattern, samples = write_shards(tmp_path / "shards")
    calls = []
    real_index = shard_index.index_shard
    monkeypatch.setattr(shard_index, "index_shard", lambda *a: calls.append(a[0]) or real_index(*a))
    first = open_shards(pattern)
    assert len(calls) == 3 and len(list((tmp_path / "cache").glob("*.npz"))) == 3
    again = open_shards(pattern)
    assert len(calls) == 3  # all three from the cache
    a, b = first, again
    assert a.shards == b.shards and a.suffixes == b.suffixes and a.classes == b.classes
    assert np.array_equal(a._members, b._members) and np.array_equal(a.labels, b.labels)
    assert [a.describe(i) for i in range(len(a))] == [b.describe(i) for i in range(len(b))]
    assert all(torch.equal(a.load(i), b.load(i)) for i in (0, 21, len(a) - 1))
    # rewrite the last shard with other samples: only it is indexed again, and the new index is used
    last = tmp_path / "shards" / "train-000002.tar"
    with wds.TarWriter(str(last)) as sink:
        sink.write({"__key__": "new", "png": encoded(np.random.default_rng(5), "png"), "cls": "7"})
    changed = open_shards(pattern)
    assert calls[3:] == [str(last)] and len(changed) == 41 and changed.labels[-1] == 7
    assert changed.describe(40).endswith("train-000002.tar:new.png")
    # a damaged cache file is indexed again, not trusted; "off" never reads or writes the cache
    for f in (tmp_path / "cache").glob("*.npz"):
        f.write_bytes(b"not an npz")
    assert len(open_shards(pattern)) == 41 and len(calls) == 7
    monkeypatch.setenv(shard_index.CACHE_ENV, "off")
    for f in (tmp_path / "cache").glob("*.npz"):
        f.unlink()
    assert len(open_shards(pattern)) == 41 and len(calls) == 10
    assert not list((tmp_path / "cache").glob("*"))  # no leftover temporary files either


def test_a_cache_folder_that_cannot_be_written_only_costs_indexing(tmp_path, monkeypatch):
    from sdae_fast.data import shard_index

    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv(shard_index.CACHE_ENV, str(blocked / "cache"))
    pattern, _ = write_shards(tmp_path / "shards")
    assert len(open_shards(pattern)) == N
