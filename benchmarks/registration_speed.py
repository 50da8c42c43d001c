"""Registered pairs per second, with the C kernels and without them (the same run).

The pairs are a scan's: each of ``--generated`` of the scale benchmark's generated images (1/10 of
the paper's scale, benchmarks/scan_scale.py, 136x112) with its top ``--k`` training images by the
default DeepSSIM model. ``register_indexed`` registers them all twice: with the C kernels (warps,
Gauss-Newton, contrast images, candidate SSIMs) and with them switched off (torch's grid_sample and
tensor Gauss-Newton, NumPy's contrast and SSIM: the code path without a compiler, and the one a GPU
takes). Prints the CPU, both rates, their ratio and the largest score difference.

    PYTHONPATH=src .venv/bin/python benchmarks/registration_speed.py [--generated 300 --k 10]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scan_scale import make_images

from deepssim import load_images
from deepssim.execution.engines import get_engine
from deepssim.hardware import cpu_description
from deepssim.metrics.deepssim_metric import DeepSSIMMetric
from deepssim.ssim import _alignment, engine, registered
from deepssim.ssim.registered import register_indexed


@contextmanager
def without_kernels():
    """The C kernels switched off, as on a machine without a compiler."""
    saved = (_alignment._warp_kernel, _alignment._ssim_kernel, engine._ssim_kernel, registered._ssim_kernel)
    _alignment._warp_kernel = _alignment._ssim_kernel = engine._ssim_kernel = registered._ssim_kernel = None
    try:
        yield
    finally:
        _alignment._warp_kernel, _alignment._ssim_kernel, engine._ssim_kernel, registered._ssim_kernel = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", default="build/bench-scan-10", help="scan_scale.py's images at 1/10")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}")
    work = Path(args.workdir)
    make_images(work / "train", 2195, 1)
    make_images(work / "generated", 65850 // 10, 2)
    train = load_images(work / "train")[1]
    generated = load_images(work / "generated")[1][: args.generated]
    metric = DeepSSIMMetric()
    neighbours = get_engine().top_k(metric.embed(generated), metric.embed(train), args.k, "exact")[1]
    ti, gi = neighbours.ravel(), np.repeat(np.arange(len(generated)), args.k)
    register_indexed(train[:50], generated[:5], ti[:50] % 50, gi[:50] % 5)  # first-use set-up
    started = time.perf_counter()
    fast = register_indexed(train, generated, ti, gi)
    fast_seconds = time.perf_counter() - started
    with without_kernels():
        started = time.perf_counter()
        reference = register_indexed(train, generated, ti, gi)
        reference_seconds = time.perf_counter() - started
    difference = np.abs(fast.ssim_registered - reference.ssim_registered).max()
    print(
        f"{len(ti):,} pairs ({len(generated)} generated x top {args.k} of {len(train)}, 136x112): "
        f"C kernels {len(ti) / fast_seconds:,.0f} pairs/s ({fast_seconds:.1f} s), without them "
        f"{len(ti) / reference_seconds:,.0f} pairs/s ({reference_seconds:.1f} s): "
        f"{reference_seconds / fast_seconds:.2f}x; largest registered SSIM difference {difference:.1e}"
    )


if __name__ == "__main__":
    main()
