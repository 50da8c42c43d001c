"""The registration cascade against full registration on the generalisation protocol's pairs.

For each bundled real source (benchmarks/generalisation.py): its images are the training set; the
protocol's planted second images (degraded copies, neighbouring slices, deformations, blends, other
subjects), aligned and misaligned (the protocol's views), are the generated set; each generated
image's top-k training images by plain SSIM are registered in full and by the cascade. Prints the
CPU, the share of generated images whose class is the same, Duplicate mismatches, the share of
pairs the cascade searched, and both times measured in the same run.

    PYTHONPATH=src .venv/bin/python benchmarks/cascade.py [--per-class 40] [--k 5] [--low 0.6 --high 0.85]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from generalisation import bundled_sources

from deepssim.evaluation.generalisation import misaligned, plant_pairs
from deepssim.hardware import cpu_description
from deepssim.ssim import ssim_matrix
from deepssim.ssim.registered import register_cascade, register_indexed


def classes(best, low, high):
    return np.where(best > high, 2, np.where(best <= low, 0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--low", type=float, default=0.6)
    parser.add_argument("--high", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}")
    sources = bundled_sources()
    total = same = duplicates = 0
    seconds = {"full": 0.0, "cascade": 0.0}
    searched = []
    for source in sources:
        pairs = plant_pairs(source, [o for o in sources if o is not source], args.per_class, args.seed)
        train = source.images.astype(np.float64)
        generated = np.concatenate([pairs.second, misaligned(pairs, args.seed)[1]])
        k = min(args.k, len(train))
        neighbours = np.argsort(-ssim_matrix(train, generated).T, axis=1, kind="stable")[:, :k]
        ti, gi = neighbours.ravel(), np.repeat(np.arange(len(generated)), k)
        started = time.perf_counter()
        full = register_indexed(train, generated, ti, gi)
        seconds["full"] += time.perf_counter() - started
        started = time.perf_counter()
        cascade = register_cascade(train, generated, ti, gi, (args.low, args.high))
        seconds["cascade"] += time.perf_counter() - started
        by_full = classes(full.ssim_registered.reshape(-1, k).max(1), args.low, args.high)
        by_cascade = classes(cascade.ssim_registered.reshape(-1, k).max(1), args.low, args.high)
        total += len(by_full)
        same += int((by_full == by_cascade).sum())
        duplicates += int(((by_full == 2) != (by_cascade == 2)).sum())
        searched.append(cascade.searched)
        print(
            f"{source.name}: {len(generated)} generated, same class {np.mean(by_full == by_cascade):.4f}, "
            f"cascade searched {cascade.searched.mean():.2f} of {len(ti)} pairs",
            flush=True,
        )
    print(
        f"all: same class {same}/{total} ({same / total:.4f}), Duplicate mismatches {duplicates}, "
        f"pairs searched {np.concatenate(searched).mean():.2f}; full {seconds['full']:.1f} s, "
        f"cascade {seconds['cascade']:.1f} s (ratio {seconds['cascade'] / seconds['full']:.2f})"
    )


if __name__ == "__main__":
    main()
