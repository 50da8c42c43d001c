"""Build data/example/ (train/ and generated/ folders of 128x128 PNG slices) from data/sources/.

Seeded and deterministic. The generated folder plants, from the training slices: exact-ish
copies with generative-style degradation (noise, blur, intensity change), misaligned copies
(flip, small rotation), near neighbours (an adjacent slice of the same volume), and different
images (held-out subjects and slice positions). planted.csv records which is which.

    python data/build_example.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.transform import resize

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"
OUT = HERE / "example"
SIZE = 128
SEED = 20261127


def square(image: np.ndarray) -> np.ndarray:
    """Fit into SIZE x SIZE: scale the long side to SIZE, pad the short side with background."""
    image = image.astype(np.float64)
    scale = SIZE / max(image.shape)
    shape = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    image = resize(image, shape, order=1, anti_aliasing=True, preserve_range=True)
    out = np.full((SIZE, SIZE), image.min())
    top, left = (SIZE - shape[0]) // 2, (SIZE - shape[1]) // 2
    out[top : top + shape[0], left : left + shape[1]] = image
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [0.5, 99.5])
    return np.clip((image - low) / (high - low) * 255, 0, 255).round().astype(np.uint8)


def raster(name: str) -> np.ndarray:
    with Image.open(SOURCES / name) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def volume_slice(name: str, axis: int, index: int) -> np.ndarray:
    volume = np.asarray(nib.load(SOURCES / name).get_fdata())
    while volume.ndim > 3:
        volume = volume[..., 0]
    return np.rot90(np.take(volume, index, axis=axis))


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Generative-style near copy: slight blur, intensity change and noise."""
    span = image.max() - image.min()
    out = ndimage.gaussian_filter(image, rng.uniform(0.3, 0.6))
    out = out * rng.uniform(0.92, 1.05) + rng.uniform(-0.02, 0.02) * span
    return out + rng.normal(0, 0.006 * span, image.shape)


def misalign(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.flip(image, axis=1) if rng.random() < 0.5 else image
    return ndimage.rotate(
        out, rng.uniform(5, 9) * rng.choice([-1, 1]), reshape=False, order=1, mode="nearest"
    )


def main() -> None:
    rng = np.random.default_rng(SEED)
    kmeans, mni, dwi = (
        "KmeansTest_T1UCharRaw.nii.gz",
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "S0_10slices.nii.gz",
    )
    train = {f"ants_r{n}": raster(f"r{n}slice.jpg") for n in (16, 27, 30, 62, 64)}
    train["itk_t1"] = raster("BrainT1Slice.png")
    train["itk_sagittal"] = raster("BrainMidSagittalSlice.png")
    for z in (22, 30, 38, 46):
        train[f"kmeans_t1_z{z}"] = volume_slice(kmeans, 2, z)
    for axis, index in ((2, 70), (2, 100), (1, 120), (0, 70)):
        train[f"mni_a{axis}_{index}"] = volume_slice(mni, axis, index)
    train["dwi_s0_z5"] = volume_slice(dwi, 2, 5)
    train = {key: square(image) for key, image in train.items()}

    planted = []
    generated = {}
    keys = sorted(train)
    for n, key in enumerate(rng.choice(keys, 6, replace=False)):
        generated[f"gen_copy_{n}"] = degrade(train[key], rng)
        planted.append((f"gen_copy_{n}", "duplicate", key))
    for n, key in enumerate(rng.choice(keys, 3, replace=False)):
        generated[f"gen_misaligned_{n}"] = degrade(misalign(train[key], rng), rng)
        planted.append((f"gen_misaligned_{n}", "duplicate_misaligned", key))
    for n, (key, z) in enumerate((("kmeans_t1_z30", 32), ("kmeans_t1_z46", 48))):
        generated[f"gen_neighbour_{n}"] = degrade(square(volume_slice(kmeans, 2, z)), rng)
        planted.append((f"gen_neighbour_{n}", "similar", key))
    different = [
        raster("r85slice.jpg"),
        raster("BrainProtonDensitySlice.png"),
        volume_slice(kmeans, 2, 12),
        volume_slice(mni, 2, 40),
        volume_slice(mni, 1, 60),
        volume_slice(mni, 0, 30),
        volume_slice(dwi, 2, 1),
    ]
    for n, image in enumerate(different):
        generated[f"gen_other_{n}"] = degrade(square(image), rng)
        planted.append((f"gen_other_{n}", "different", ""))

    for folder, images in (("train", train), ("generated", generated)):
        (OUT / folder).mkdir(parents=True, exist_ok=True)
        for key, image in images.items():
            Image.fromarray(to_uint8(image)).save(OUT / folder / f"{key}.png", optimize=True)
    with open(OUT / "planted.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["generated_key", "kind", "source_train_key"])
        writer.writerows(planted)
    print(f"wrote {len(train)} training and {len(generated)} generated images to {OUT}")


if __name__ == "__main__":
    main()
