"""The registration cascade against full registration, on three kinds of generated images.

- ``protocol``: each bundled real source's images are the training set; the generalisation
  protocol's planted second images (degraded copies, neighbouring slices, deformations, blends,
  other subjects), aligned and misaligned, are the generated set.
- ``scale``: the scale benchmark's images (benchmarks/scan_scale.py: shifted, re-contrasted, noisy
  variations of the example slices, 136x112), ``--scale-generated`` of them against 2,195 training.
- ``case-study`` (with ``--case-study DIR``, the dose study's work folder): a diffusion model's
  2,000 generated images against its unique training images and controls, 64x64.

Each generated image's top k training images come from the default DeepSSIM model (as in a scan);
thresholds are registered SSIM's defaults for the image size. Prints the CPU; per set the share of
generated images whose class is the same, Duplicate mismatches, Similar images whose best pair has
another score, the share of pairs the cascade registered, the largest score difference of a pair
both registered, and both times (same run; the faster of ``--repeats`` runs each, alternating).

    PYTHONPATH=src .venv/bin/python benchmarks/cascade.py [--k 10] [--case-study build/dose]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from generalisation import bundled_sources
from scan_scale import make_images

from deepssim import LoadOptions, load_images
from deepssim.evaluation.generalisation import misaligned, plant_pairs
from deepssim.execution.engines import get_engine
from deepssim.hardware import cpu_description
from deepssim.metrics.deepssim_metric import DeepSSIMMetric
from deepssim.scanning.decide import REGISTERED_SSIM, classify, default_thresholds
from deepssim.ssim.registered import register_cascade, register_indexed


def problems(args):
    """(name, training images, generated images) of every set."""
    sources = bundled_sources()
    for source in sources:
        pairs = plant_pairs(source, [o for o in sources if o is not source], args.per_class, args.seed)
        generated = np.concatenate([pairs.second, misaligned(pairs, args.seed)[1]])
        yield f"protocol {source.name}", source.images.astype(np.float64), generated
    work = Path(args.workdir)
    make_images(work / "train", 2195, 1)
    make_images(work / "generated", 65850 // 10, 2)
    train = load_images(work / "train")[1]
    yield "scale", train, load_images(work / "generated")[1][: args.scale_generated]
    if args.case_study:
        folder, options = Path(args.case_study), LoadOptions(size=(64, 64), fit="resize")
        train = np.concatenate([load_images(folder / "data" / f, options)[1] for f in ("unique", "control")])
        yield "case study", train, load_images(folder / "generated_run", options)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--scale-generated", type=int, default=800)
    parser.add_argument("--workdir", default="build/bench-scan-10", help="scan_scale.py's images at 1/10")
    parser.add_argument("--case-study", help="the dose study's work folder (ldm_dose_response.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each mode, alternating")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}")
    metric = DeepSSIMMetric()
    totals = np.zeros(6)
    for name, train, generated in problems(args):
        k = min(args.k, len(train))
        neighbours = get_engine().top_k(metric.embed(generated), metric.embed(train), k, "exact")[1]
        ti, gi = neighbours.ravel(), np.repeat(np.arange(len(generated)), k)
        thresholds = default_thresholds(REGISTERED_SSIM, train.shape[1:], None)
        full_seconds = cascade_seconds = np.inf
        for _ in range(args.repeats):  # each run prepares its training images anew
            started = time.perf_counter()
            full = register_indexed(train, generated, ti, gi)
            full_seconds = min(full_seconds, time.perf_counter() - started)
            started = time.perf_counter()
            cascade = register_cascade(train, generated, ti, gi, (thresholds.low, thresholds.high))
            cascade_seconds = min(cascade_seconds, time.perf_counter() - started)
        best_full = full.ssim_registered.reshape(-1, k).max(axis=1)
        best_cascade = cascade.ssim_registered.reshape(-1, k).max(axis=1)
        by_full, by_cascade = classify(best_full, thresholds), classify(best_cascade, thresholds)
        similar = (by_full == 1) & (by_cascade == 1)
        both = cascade.searched
        difference = np.abs(cascade.ssim_registered[both] - full.ssim_registered[both]).max()
        counts = (
            len(by_full),
            int((by_full == by_cascade).sum()),
            int(((by_full == 2) != (by_cascade == 2)).sum()),
            int((similar & (np.abs(best_full - best_cascade) > 1e-9)).sum()),
            full_seconds,
            cascade_seconds,
        )
        totals += counts
        print(
            f"{name} ({len(generated)} generated x top {k} of {len(train)}, "
            f"{train.shape[1]}x{train.shape[2]}, thresholds {thresholds.low} / {thresholds.high}): "
            f"same class {counts[1]}/{counts[0]}, Duplicate "
            f"mismatches {counts[2]}, Similar with another best score {counts[3]}; cascade registered "
            f"{cascade.searched.mean():.2f} of {len(ti)} pairs; full {full_seconds:.1f} s, cascade "
            f"{cascade_seconds:.1f} s ({cascade_seconds / full_seconds:.2f}); largest difference of a "
            f"pair both registered {difference:.1e}",
            flush=True,
        )
    total, same, duplicates, similar, full_seconds, cascade_seconds = totals
    print(
        f"all: same class {same:.0f}/{total:.0f} ({same / total:.4f}), "
        f"Duplicate mismatches {duplicates:.0f}, "
        f"Similar with another best score {similar:.0f}; full {full_seconds:.1f} s, cascade "
        f"{cascade_seconds:.1f} s ({cascade_seconds / full_seconds:.2f})"
    )


if __name__ == "__main__":
    main()
