"""Memory does not grow with the image count: 2,000 vs 20,000 small JPEGs, a few MAE steps each.

Each run is a fresh process (``ru_maxrss`` is a process-lifetime peak) with one DataLoader worker.
The bound: the 20,000-image run's peak RSS, of the training process and of its worker, stays
within 32 MiB of the 2,000-image run's (the listing's transient Python strings are a few MiB).
Holding the images in memory, as the old loader did, would add 18,000 × 3 × 32 × 32 × 4 B =
211 MiB at 32 px (10 GiB for ImageNet at 224 px); the path table (one bytes blob + offsets) costs
~30 B per image. Measured here (2 shared cores): main 746 -> 753 MiB, worker 432 -> 432 MiB;
about 15 s for the whole test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

RUN = textwrap.dedent("""
    import json, resource, sys
    import torch
    from sdae_fast.train.cli import make_args
    from sdae_fast.train.loop import pretrain

    args = make_args(method="mae", recipe="demo", data=sys.argv[1], img_size=32, batch_size=32, steps=4, out=sys.argv[2],
                     ckpt_every=0, knn=False, export=False, quiet=True, workers=1, holdout=0.0, device="cpu")
    res = pretrain(args)
    assert res["step"] == 4 and all(l == l for l in res["losses"])
    usage = lambda who: resource.getrusage(who).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"main": usage(resource.RUSAGE_SELF), "worker": usage(resource.RUSAGE_CHILDREN)}))
""")
BOUND_MIB = 32


def _folder(root, n):
    base = np.random.default_rng(0).integers(0, 255, (64, 24, 24, 3), dtype=np.uint8)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(base[i % 64]).save(root / f"c{i % 10}" / f"{i:06d}.jpg", quality=80)
    return root


def _peak_rss(tmp_path, n):
    folder = _folder(tmp_path / f"imgs{n}", n)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", RUN, str(folder), str(tmp_path / f"out{n}")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_the_image_count(tmp_path):
    small, large = _peak_rss(tmp_path, 2_000), _peak_rss(tmp_path, 20_000)
    for who in ("main", "worker"):
        assert large[who] - small[who] < BOUND_MIB, f"{who}: {small[who]:.0f} -> {large[who]:.0f} MiB"
