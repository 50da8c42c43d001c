"""Registered 3D SSIM (``deepssim.ssim.registered3d``): seconds per pair and interpolation bias.

Volumes: crops of the bundled MNI T1 template (off-centre along left-right, smoothed, resized into a
cube with a background border). Per size, registered SSIM against the reference it should equal:
untouched and noisy copies (noise in two channels, magnitude) against their plain ssim3d; moved
copies (seeded random rigid transforms within the search range, by scipy, noise added after the
move) against the unmoved noisy copy's; different subjects (the bundled anatomical.nii) against
their plain SSIM (how much registration raises an unrelated pair).

    .venv/bin/python benchmarks/registered_ssim3d.py [--sizes 64 128] [--pairs 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from deepssim.hardware import cpu_description
from deepssim.ssim.registered3d import Registration3DSettings, RigidTransform3D, register_volumes
from deepssim.ssim.volume import ssim3d

SOURCES = Path(__file__).resolve().parents[1] / "data" / "sources"


def framed(data: np.ndarray, size: int, margin: int) -> np.ndarray:
    inner = size - 2 * margin
    data = ndimage.gaussian_filter(data, np.array(data.shape) / inner)
    small = ndimage.zoom(data, inner / np.array(data.shape), order=1)
    out = np.full((size,) * 3, float(small.min()))
    out[tuple(slice(margin, margin + n) for n in small.shape)] = small
    return out


def moved(volume: np.ndarray, transform: RigidTransform3D) -> np.ndarray:
    back = transform.linear.T
    centre = (np.array(volume.shape) - 1) / 2
    offset = centre - back @ (centre + np.asarray(transform.shift_vox))
    return ndimage.affine_transform(volume, back, offset, order=1, mode="constant", cval=volume.min())


def noisy(volume: np.ndarray, rng, level: float = 0.04) -> np.ndarray:
    sigma = level * volume.max()
    return np.hypot(volume + rng.normal(0, sigma, volume.shape), rng.normal(0, sigma, volume.shape))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--pairs", type=int, default=3, help="pairs per kind and size")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}")
    template = np.asarray(nib.load(SOURCES / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").get_fdata())
    other = np.asarray(nib.load(SOURCES / "anatomical.nii").get_fdata())
    settings = Registration3DSettings()
    print(f"settings: {settings}")
    print("| size | kind | pairs | reference | registered | ratio | max diff | s/pair |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        margin = size // 8
        rng = np.random.default_rng(size)
        crops = [template[int(template.shape[0] * f) :] for f in np.linspace(0.2, 0.35, args.pairs)]
        volumes = [framed(c, size, margin) for c in crops]
        limit = 0.75 * settings.max_shift_fraction * size  # moves the search can undo after rotation
        kinds: dict[str, list[tuple[float, float, float]]] = {}
        for v in volumes:
            cases = {
                "untouched copy": (v, ssim3d(v, v)),
                "noisy copy": (n := noisy(v, rng), ssim3d(v, n)),
            }
            t = RigidTransform3D((), rng.uniform(-10, 10, 3), rng.uniform(-limit, limit, 3).round(2))
            cases["moved noisy copy"] = (noisy(moved(v, t), rng), ssim3d(v, n))
            cases["different subject"] = (d := framed(other, size, margin), ssim3d(v, d))
            for kind, (generated, reference) in cases.items():
                found = register_volumes(v, generated, settings)
                kinds.setdefault(kind, []).append((reference, found.ssim_registered, found.seconds))
        for kind, rows in kinds.items():
            ref, reg, sec = (np.array(c) for c in zip(*rows, strict=True))
            print(
                f"| {size}^3 | {kind} | {len(rows)} | {ref.mean():.3f} | {reg.mean():.3f} | "
                f"{(reg / ref).mean():.3f} | {np.abs(reg - ref).max():.3f} | {sec.mean():.2f} |"
            )
    print("reference: plain ssim3d of the pair (moved copies: of the volume and its unmoved noisy copy);")
    print("ratio: mean of registered / reference per pair; max diff: max |registered - reference|.")


if __name__ == "__main__":
    main()
