"""SSIM-matrix throughput of the engine against scikit-image, measured in the same run.

scikit-image runs in a process pool with as many workers as the engine has threads, on the
same z-scored images, so the ratio compares equal hardware. Prints pairs/s, the ratio and the
max |difference| on the pairs both computed.

    .venv/bin/python benchmarks/ssim_matrix.py [--train 512 --generated 512 --reference-pairs 4000]
        [--instruction-set avx2]   # the C kernel's AVX2 (or baseline) code on a CPU that has more
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from skimage.metrics import structural_similarity

import deepssim
from deepssim.hardware import cpu_description
from deepssim.io.normalise import zscore

SHAPE = (136, 112)  # the paper's brain-slice size


def generated_images(count: int, seed: int) -> np.ndarray:
    """Smooth random 'anatomy' on a flat background, like skull-stripped slices."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, *SHAPE)).cumsum(1).cumsum(2)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    mask = ((yy - SHAPE[0] / 2) / 60) ** 2 + ((xx - SHAPE[1] / 2) / 48) ** 2 < 1
    return np.where(mask, images, images.min(axis=(1, 2), keepdims=True))


_WORKER_IMAGES: dict[str, np.ndarray] = {}


def _init_worker(za: np.ndarray, zb: np.ndarray) -> None:
    """Send the images to each worker once, so only pair indices travel per task."""
    _WORKER_IMAGES.update(za=za, zb=zb)


def _reference_pairs(pairs) -> list[float]:
    za, zb = _WORKER_IMAGES["za"], _WORKER_IMAGES["zb"]
    return [structural_similarity(za[i], zb[j], data_range=za[i].max() - za[i].min()) for i, j in pairs]


def reference_throughput(train, generated, pairs, workers: int) -> tuple[float, np.ndarray]:
    za = zscore(train)
    zb = zscore(generated)
    chunks = np.array_split(np.array(pairs), workers * 4)
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(za, zb)) as pool:
        list(pool.map(_reference_pairs, [chunks[0][:1]] * workers))  # start the workers
        start = time.perf_counter()
        values = [v for part in pool.map(_reference_pairs, chunks) for v in part]
        seconds = time.perf_counter() - start
    return len(pairs) / seconds, np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--generated", type=int, default=512)
    parser.add_argument("--reference-pairs", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instruction-set", choices=("avx512", "avx2", "baseline"))
    args = parser.parse_args()
    from deepssim.ssim.engine import _ssim_kernel

    if args.instruction_set and not (_ssim_kernel and _ssim_kernel.set_instruction_set(args.instruction_set)):
        parser.error(f"this CPU or build has no {args.instruction_set} kernel")
    threads = torch.get_num_threads()
    train, generated = generated_images(args.train, 1), generated_images(args.generated, 2)
    kernel = _ssim_kernel.instruction_set() if _ssim_kernel else "not built"
    print(f"CPU: {cpu_description()}; C kernel instruction set: {kernel}")
    print(
        f"{args.train} x {args.generated} images of {SHAPE[0]}x{SHAPE[1]}, {threads} threads/workers, "
        f"cpu count {os.cpu_count()}"
    )

    rng = np.random.default_rng(0)
    sample = list(
        zip(
            rng.integers(0, args.train, args.reference_pairs),
            rng.integers(0, args.generated, args.reference_pairs),
            strict=True,
        )
    )
    reference_rate, reference_values = reference_throughput(train, generated, sample, threads)
    print(f"scikit-image (process pool of {threads}): {reference_rate:,.0f} pairs/s")

    for backend, dtype in (("c", np.float32), ("c", np.float64), ("torch", np.float32)):
        n_train = args.train if backend == "c" else min(args.train, 128)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            matrix = deepssim.ssim_matrix(train[:n_train], generated, dtype=dtype, backend=backend)
            times.append(time.perf_counter() - start)
        rate = n_train * args.generated / min(times)
        sampled = [(i, j) for i, j in sample if i < n_train]
        difference = (
            max(
                abs(float(matrix[i, j]) - reference_values[k])
                for k, (i, j) in enumerate(sample)
                if i < n_train
            )
            if sampled
            else float("nan")
        )
        print(
            f"deepssim {backend:5s} {np.dtype(dtype).name}: {rate:,.0f} pairs/s  "
            f"ratio {rate / reference_rate:6.1f}x  max |diff| vs scikit-image {difference:.2e}"
        )


if __name__ == "__main__":
    main()
