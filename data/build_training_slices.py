"""Write the training images of the bundled default model: every bundled real MRI, sliced
along all three axes, at 128x128.

Each volume and axis becomes one ``.npy`` stack (slices in order, so neighbouring slices stay
neighbours); each 2D source image becomes a one-image ``.npy``. Slices are resampled to square
pixels from the voxel sizes, scaled so the long side is 128 and padded with background, and
near-empty slices (the loader's foreground rule) are left out.

    python data/build_training_slices.py build/default-train
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from skimage.transform import resize

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"
SIZE = 128
MIN_SIDE = 24  # slices narrower than this (in voxels) carry too little anatomy
VOLUMES = {
    "KmeansTest_T1UCharRaw.nii.gz": (0, 1, 2),
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz": (0, 1, 2),
    "anatomical.nii": (0, 1, 2),
    "S0_10slices.nii.gz": (2,),  # ten thick slices: only the in-plane axis is usable
}
IMAGES = [
    "r16slice.jpg",
    "r27slice.jpg",
    "r30slice.jpg",
    "r62slice.jpg",
    "r64slice.jpg",
    "r85slice.jpg",
    "BrainT1Slice.png",
    "BrainProtonDensitySlice.png",
    "BrainMidSagittalSlice.png",
]


def square(image: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Resample to square pixels, scale the long side to SIZE, pad with the background."""
    height, width = image.shape[0] * spacing[0], image.shape[1] * spacing[1]
    scale = SIZE / max(height, width)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = resize(image, shape, order=1, anti_aliasing=True, preserve_range=True)
    out = np.full((SIZE, SIZE), image.min())
    top, left = (SIZE - shape[0]) // 2, (SIZE - shape[1]) // 2
    out[top : top + shape[0], left : left + shape[1]] = image
    return out


def has_foreground(image: np.ndarray, level: float) -> bool:
    """The loader's rule: at least 5% of pixels above 10% of the volume's robust maximum."""
    return (image > level).mean() >= 0.05


def volume_stacks(name: str, axes) -> dict[str, np.ndarray]:
    image = nib.load(SOURCES / name)
    volume = np.asarray(image.get_fdata(), dtype=np.float64)
    zooms = image.header.get_zooms()[:3]
    while volume.ndim > 3:
        volume = volume[..., 0]
    volume = volume - volume.min()
    level = 0.1 * np.percentile(volume, 99.5)
    stacks = {}
    for axis in axes:
        in_plane = [a for a in range(3) if a != axis]
        if min(volume.shape[a] for a in in_plane) < MIN_SIDE:
            continue
        spacing = (float(zooms[in_plane[0]]), float(zooms[in_plane[1]]))
        slices = [np.take(volume, i, axis=axis) for i in range(volume.shape[axis])]
        kept = [np.rot90(square(s, spacing)) for s in slices if has_foreground(s, level)]
        stacks[f"{name.split('.')[0]}_axis{axis}"] = np.stack(kept).astype(np.float32)
    return stacks


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, axes in VOLUMES.items():
        for stem, stack in volume_stacks(name, axes).items():
            np.save(out / f"{stem}.npy", stack)
            total += len(stack)
    for name in IMAGES:
        with Image.open(SOURCES / name) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float64)
        np.save(out / f"{Path(name).stem}.npy", square(gray, (1.0, 1.0)).astype(np.float32))
        total += 1
    print(f"wrote {total} images of {SIZE}x{SIZE} to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/default-train"))
