"""3D SSIM throughput of the engine (``deepssim.ssim.volume``) against scikit-image, same run.

Pairs of 128^3 volumes: crops of the bundled MNI T1 template and of noisy, shifted copies of it.
scikit-image's ``structural_similarity`` (on the z-scored volumes, data range of the training one)
is timed in one process and in a pool of as many processes as the engine has threads, so the
second ratio compares equal hardware. Prints seconds per pair, the ratios and the max |difference|.

    .venv/bin/python benchmarks/ssim3d.py [--pairs 4] [--size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from skimage.metrics import structural_similarity

from deepssim.hardware import cpu_description
from deepssim.ssim.volume import ssim3d_profile

SOURCES = Path(__file__).resolve().parents[1] / "data" / "sources"


def volume_pairs(count: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    template = np.asarray(nib.load(SOURCES / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").get_fdata())
    pairs = []
    for _ in range(count):
        corner = [int(rng.integers(0, n - size - 8)) for n in template.shape]
        a = template[tuple(slice(c, c + size) for c in corner)]
        moved = [c + int(rng.integers(-4, 5)) for c in corner]
        b = template[tuple(slice(c, c + size) for c in moved)] + rng.normal(
            0, rng.uniform(1, 10), (size,) * 3
        )
        pairs.append((np.ascontiguousarray(a), np.ascontiguousarray(b)))
    return pairs


def reference(pair) -> float:
    a, b = pair
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    return structural_similarity(za, zb, data_range=za.max() - za.min())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"CPU: {cpu_description()}")
    pairs = volume_pairs(args.pairs, args.size)

    expected = [reference(pair) for pair in pairs]  # also warms up
    # Interleaved, best of --repeats for each side, so both see the same load on a shared machine.
    skimage_one = np.full(len(pairs), np.inf)
    ours = {count: np.full(len(pairs), np.inf) for count in sorted({1, threads})}
    for _ in range(args.repeats):
        for i, (a, b) in enumerate(pairs):
            started = time.perf_counter()
            reference((a, b))
            skimage_one[i] = min(skimage_one[i], time.perf_counter() - started)
            for count, best in ours.items():
                started = time.perf_counter()
                got = ssim3d_profile(a, b, threads=count)[0]
                best[i] = min(best[i], time.perf_counter() - started)
    with ProcessPoolExecutor(threads) as pool:
        list(pool.map(reference, pairs[:threads]))  # start the workers
        started = time.perf_counter()
        pooled = list(pool.map(reference, pairs))
        skimage_pool = (time.perf_counter() - started) / len(pairs)
    got = [ssim3d_profile(a, b)[0] for a, b in pairs]
    skimage_one = skimage_one.mean()
    timings = {count: best.mean() for count, best in ours.items()}
    difference = max(abs(g - e) for g, e in zip(got, expected, strict=True))
    assert max(abs(p - e) for p, e in zip(pooled, expected, strict=True)) == 0
    print(f"{len(pairs)} pairs of {args.size}^3, SSIM {min(expected):.3f}-{max(expected):.3f}")
    print(f"scikit-image, 1 process:          {skimage_one * 1000:8.1f} ms/pair")
    print(f"scikit-image, {threads} processes:        {skimage_pool * 1000:8.1f} ms/pair")
    for count, seconds in timings.items():
        print(
            f"deepssim 3D kernel, {count} thread(s):  {seconds * 1000:8.1f} ms/pair   "
            f"{skimage_one / seconds:6.1f}x one scikit-image process, "
            f"{skimage_pool / seconds:6.1f}x {threads} processes"
        )
    print(f"max |difference| from scikit-image: {difference:.2e}")


if __name__ == "__main__":
    main()
