"""Registered-SSIM throughput and quality on brain slices, against plain SSIM on the same pairs.

Pairs come from slices of data/sources/KmeansTest_T1UCharRaw.nii.gz brought to each size (centred
pad/crop): misaligned noisy copies (random flip, rotation +-15 deg, shift +-8%, scale 0.92-1.08, made
with scipy), aligned noisy copies (resampling must not lift their score) and other slices. Prints the
CPU, pairs/s of register_pairs and of ssim_pairs in the same run, and the quality of the registration.

    .venv/bin/python benchmarks/registered_ssim.py [--pairs 512] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from deepssim.hardware import cpu_description
from deepssim.io.normalise import fit_to_size
from deepssim.ssim import ssim_pairs
from deepssim.ssim.registered import FLIPS, register_pairs

VOLUME = Path(__file__).resolve().parents[1] / "data" / "sources" / "KmeansTest_T1UCharRaw.nii.gz"
SHAPES = ((128, 128), (136, 112))
KINDS = ("misaligned copy", "misaligned copy", "aligned copy", "other slice")


def transform(image: np.ndarray, flip: str, rotation_deg: float, shift, scale: float) -> np.ndarray:
    """Flip, then rotate and scale about the centre, then shift; cubic spline, background fill."""
    if flip in ("rows", "both"):
        image = image[::-1]
    if flip in ("cols", "both"):
        image = image[:, ::-1]
    angle = math.radians(rotation_deg)
    forward = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    inverse = np.linalg.inv(forward)
    centre = (np.array(image.shape) - 1) / 2
    offset = centre - inverse @ (centre + np.asarray(shift))
    return ndimage.affine_transform(
        np.ascontiguousarray(image), inverse, offset=offset, order=3, mode="constant", cval=image.min()
    )


def make_pairs(count: int, shape, seed: int = 0):
    """(train, generated, before, kind, flip): before = SSIM of a copy before it was misaligned."""
    volume = np.asarray(nib.load(VOLUME).dataobj, dtype=np.float64)
    rng = np.random.default_rng(seed)
    train, generated, noisy_copies, kinds, flips = [], [], [], [], []
    for i in range(count):
        k = int(rng.integers(12, 50))
        slice_ = fit_to_size(volume[:, :, k], shape)
        kind, flip = KINDS[i % len(KINDS)], "none"
        noisy = slice_ + rng.normal(0, rng.uniform(2, 8), shape)
        if kind == "other slice":
            other = int(np.clip(k + rng.choice([-1, 1]) * rng.integers(8, 16), 5, 58))
            image = fit_to_size(volume[:, :, other], shape)
            if rng.random() < 0.5:
                image = transform(image, rng.choice(FLIPS), rng.uniform(-15, 15), rng.uniform(-8, 8, 2), 1.0)
        elif kind == "aligned copy":
            image = noisy
        else:
            flip = str(rng.choice(FLIPS))
            shift = rng.uniform(-0.08, 0.08, 2) * np.array(shape)
            image = transform(noisy, flip, rng.uniform(-15, 15), shift, rng.uniform(0.92, 1.08))
        train.append(slice_)
        generated.append(image)
        noisy_copies.append(noisy)
        kinds.append(kind)
        flips.append(flip)
    train, noisy_copies = np.stack(train), np.stack(noisy_copies)
    return train, np.stack(generated), ssim_pairs(train, noisy_copies), np.array(kinds), np.array(flips)


def best_time(function, repeats: int) -> tuple[float, object]:
    """Shortest wall time of ``repeats`` calls, and the last call's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def run_shape(shape, pairs: int, repeats: int) -> None:
    train, generated, before, kind, flip = make_pairs(pairs, shape)
    register_pairs(train[:8], generated[:8])  # warm-up
    registered_s, result = best_time(lambda: register_pairs(train, generated), repeats)
    plain_s, _ = best_time(lambda: ssim_pairs(train, generated), repeats)
    rate, plain_rate = pairs / registered_s, pairs / plain_s
    print(
        f"\n{shape[0]}x{shape[1]}, {pairs} pairs: register_pairs {rate:,.0f} pairs/s, "
        f"ssim_pairs {plain_rate:,.0f} pairs/s (registered costs {plain_rate / rate:.1f}x plain)"
    )
    copies = kind == "misaligned copy"
    gain = result.ssim_registered[copies] - before[copies]
    print(
        f"  misaligned copies: SSIM before misalignment {before[copies].mean():.4f}, "
        f"plain {result.ssim_plain[copies].mean():.4f}, "
        f"registered {result.ssim_registered[copies].mean():.4f}"
        f"\n    registered - before: mean {gain.mean():+.4f}, median {np.median(gain):+.4f}, "
        f"worst {gain.min():+.4f}; flip found {np.mean(result.flip[copies] == flip[copies]):.0%}"
    )
    aligned = kind == "aligned copy"
    lift = result.ssim_registered[aligned] - result.ssim_plain[aligned]
    print(f"  aligned noisy copies: registered - plain at most {lift.max():+.4f}")
    others = kind == "other slice"
    print(
        f"  other slices: plain {result.ssim_plain[others].mean():.4f}, "
        f"registered {result.ssim_registered[others].mean():.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}")
    for shape in SHAPES:
        run_shape(shape, args.pairs, args.repeats)


if __name__ == "__main__":
    main()
