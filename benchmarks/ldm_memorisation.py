"""The case-study experiment: train the small latent diffusion model at the three duplication
levels, generate, scan with DeepSSIM (default model) and with SSIM, and print the share of
generated images in each class per level.

Every level gets the same number of optimisation steps (epochs are set from the duplicated
set's size), so the levels differ in how often each image is seen, not in training length;
on 2 CPU cores the paper's fixed epoch count would leave the un-duplicated model untrained.
DeepSSIM scans at 128x128 (the default model's training size; images are upsampled), SSIM at
the native 64x64.

Training images: 64 axial slices (every 4th kept slice of axis 2) of the bundled volumes,
written by data/build_training_slices.py, at 64x64.

    .venv/bin/python data/build_training_slices.py build/default-train
    .venv/bin/python benchmarks/ldm_memorisation.py [--per-image 10 --workdir build/ldm]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deepssim import LoadOptions, load_images, scan
from deepssim.experiments.ldm import CONFIGS, generate, repetition_counts, train_diffusion, train_vae
from deepssim.hardware import cpu_description

LEVELS = ("none", "low", "high")


def training_folder(source: Path, out: Path, count: int) -> Path:
    """Write `count` 64x64 PNG slices (axial stacks of the bundled volumes) once."""
    if out.is_dir() and len(list(out.glob("*.png"))) == count:
        return out
    out.mkdir(parents=True, exist_ok=True)
    stacks = sorted(source.glob("*_axis2.npy"))
    slices = [(path.stem, i, image) for path in stacks for i, image in enumerate(np.load(path)) if i % 4 == 0]
    chosen = np.random.default_rng(0).choice(len(slices), size=min(count, len(slices)), replace=False)
    from skimage.transform import resize

    for index in sorted(chosen):
        stem, i, image = slices[index]
        small = resize(image, (64, 64), anti_aliasing=True, preserve_range=True)
        scaled = (small - small.min()) / np.ptp(small)
        Image.fromarray(np.round(scaled * 65535).astype(np.uint16)).save(out / f"{stem}_{i:03d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="build/default-train")
    parser.add_argument("--workdir", default="build/ldm")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--diffusion-steps", type=int, default=1000)
    args = parser.parse_args()
    work = Path(args.workdir)
    train = training_folder(Path(args.source), work / "train", args.images)
    count = len(load_images(train)[0])
    print(f"CPU: {cpu_description()}")
    print(f"{count} training images of 64x64 in {train}")
    rows = []
    for level in LEVELS:
        run = work / f"run_{level}"
        started = time.perf_counter()
        seen = sum(repetition_counts(count, level, 0))  # images per epoch after duplication
        config = CONFIGS["small"]
        vae_epochs = max(1, round(args.vae_steps / -(-seen // config.vae_batch_size)))
        diffusion_epochs = max(1, round(args.diffusion_steps / -(-seen // config.diffusion_batch_size)))
        train_vae(train, run, "small", level, vae_epochs=vae_epochs, diffusion_epochs=diffusion_epochs)
        vae_seconds = time.perf_counter() - started
        train_diffusion(train, run)
        train_seconds = time.perf_counter() - started
        generated = work / f"generated_{level}"
        generate(run, generated, per_image=args.per_image)
        for metric, size in (("deepssim", (128, 128)), ("ssim", (64, 64))):
            options = LoadOptions(size=size, fit="resize")
            result = scan(train, generated, metric=metric, cache=False, options=options)
            result.save(work / f"scan_{level}_{metric}", gallery_size=12)
            classes = result.summary["generated_by_class"]
            memorised = result.summary["training_images_with_a_duplicate"]
            rows.append((level, metric, classes, memorised, vae_seconds, train_seconds))
            print(
                f"{level:<5} {metric:<8} "
                + "  ".join(
                    f"{name} {entry['share']:.1%} [{entry['ci95'][0]:.1%}, {entry['ci95'][1]:.1%}]"
                    for name, entry in classes.items()
                )
                + f"  memorised {memorised['count']}/{result.summary['training_images']}"
                + f"  (train {train_seconds / 60:.1f} min, VAE {vae_seconds / 60:.1f})"
            )
    print()
    print("| duplication | metric | Duplicate | Similar | Different | training images with a Duplicate |")
    print("|---|---|---|---|---|---|")
    for level, metric, classes, memorised, _, _ in rows:
        cells = [f"{e['share']:.1%} [{e['ci95'][0]:.1%}, {e['ci95'][1]:.1%}]" for e in classes.values()]
        print(
            f"| {level} | {metric} | "
            + " | ".join(cells)
            + f" | {memorised['count']} ({memorised['share']:.0%}) |"
        )


if __name__ == "__main__":
    main()
