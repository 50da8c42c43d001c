"""Registration's warps: torch's grid_sample against the C kernel (_warp_kernel.c), alone and end to end.

Images: synthetic slices (deepssim.training.synthetic, 24 of each of 4 pseudo-subjects), 128x128, and
the evaluation protocol's misaligned views of them as the moved copies. First each warp registration
does, on its own, with random maps of the search range (flips, +-15 deg, scales 0.9-1.1, shifts
+-10%): bilinear K=2 maps on a 32x32 sample grid from a 64x64 level (Gauss-Newton at the middle
level), bilinear K=1 on a 64x64 grid from 128x128 (Gauss-Newton at full resolution), bicubic at
128x128 (the final warp). Then register_indexed's pairs/s with either warp. The two are timed
alternately in one run (best of --repeats); compare the ratios, not the absolute times.

    .venv/bin/python benchmarks/warp_kernel.py [--pairs 2000] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from deepssim.evaluation.protocol import misaligned_views
from deepssim.hardware import cpu_description
from deepssim.io.normalise import zscore
from deepssim.ssim import _alignment
from deepssim.ssim._alignment import _level, _sampling_map, _warp
from deepssim.ssim.registered import register_indexed
from deepssim.training.synthetic import synthetic_slices

FULL = (128, 128)
SUBJECTS = 4  # pseudo-subjects, 24 slices each; every slice has pairs / 96 misaligned views
CASES = (  # (name, level, maps per image, sample stride, mode)
    ("Gauss-Newton, middle level", (64, 64), 2, 2, "bilinear"),
    ("Gauss-Newton, full level", (128, 128), 1, 2, "bilinear"),
    ("final warp", (128, 128), 1, 1, "bicubic"),
)


@contextmanager
def grid_sample_only():
    kernel = _alignment._warp_kernel
    _alignment._warp_kernel = None
    try:
        yield
    finally:
        _alignment._warp_kernel = kernel


def best_of(run, repeats: int) -> tuple[float, float, object]:
    """Best seconds of run() with the C kernel and with grid_sample, alternating; and both results."""
    times, results = {True: [], False: []}, {}
    for _ in range(repeats):
        for kernel in (True, False):
            with nullcontext() if kernel else grid_sample_only():
                start = time.perf_counter()
                results[kernel] = run()
                times[kernel].append(time.perf_counter() - start)
    return min(times[True]), min(times[False]), results


def images_and_views(pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training slices, misaligned views (one per pair) and each view's training slice."""
    train = np.concatenate([synthetic_slices(seed, 24, size=FULL)[0] for seed in range(SUBJECTS)])
    views, owners, seed = [], [], 0
    while sum(len(v) for v in views) < pairs:
        views.append(misaligned_views(train, seed))
        owners.append(np.arange(len(train)))
        seed += 1
    return train, np.concatenate(views)[:pairs], np.concatenate(owners)[:pairs]


def kernel_cases(train: np.ndarray, pairs: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    z = torch.from_numpy(zscore(train)).float()
    print(f"Warps alone, {pairs} images (ms per call; grid_sample / C):")
    for name, level, k, stride, mode in CASES:
        images = F.adaptive_avg_pool2d(z[:, None], level)[:, 0]
        images = images[rng.integers(0, len(images), pairs)]
        n = pairs * k
        shift = rng.uniform(-0.1, 0.1, (n, 2)) * np.asarray(FULL)
        linear, offset = _sampling_map(
            rng.integers(0, 4, n), rng.uniform(-15, 15, n), rng.uniform(0.9, 1.1, n), shift
        )
        linear, offset = linear.reshape(pairs, k, 2, 2), offset.reshape(pairs, k, 2)
        rows, cols = (x[::stride] for x in _level(level, FULL, "cpu"))
        warp = partial(_warp, images, linear, offset, rows, cols, FULL, mode)
        c, torch_time, out = best_of(warp, repeats)
        difference = (out[True] - out[False]).abs().max().item()
        print(
            f"  {mode:8s} {name}: K={k}, {len(rows)}x{len(cols)} from {level[0]}x{level[1]}: "
            f"grid_sample {torch_time * 1e3:.0f}, C {c * 1e3:.0f}, ratio {torch_time / c:.2f}x "
            f"(max |difference| {difference:.1e})"
        )


def end_to_end(train, views, owners, repeats: int) -> None:
    index = np.arange(len(views))
    c, torch_time, out = best_of(lambda: register_indexed(train, views, owners, index), repeats)
    n = len(views)
    difference = np.abs(out[True].ssim_registered - out[False].ssim_registered).max()
    same = all(
        np.array_equal(getattr(out[True], f), getattr(out[False], f))
        for f in ("flip", "rotation_deg", "scale", "shift_px", "gamma")
    )
    print(f"register_indexed, {n} pairs of {FULL[0]}x{FULL[1]} (misaligned views of synthetic slices):")
    print(
        f"  grid_sample {n / torch_time:.0f} pairs/s, C {n / c:.0f} pairs/s, ratio {torch_time / c:.2f}x "
        f"(max |difference| of ssim_registered {difference:.1e}, transforms identical: {same})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}")
    if _alignment._warp_kernel is None:
        raise SystemExit("the warp kernel is not built (python setup.py build_ext --inplace)")
    train, views, owners = images_and_views(args.pairs)
    kernel_cases(train, args.pairs, args.repeats)
    end_to_end(train, views, owners, args.repeats)


if __name__ == "__main__":
    main()
