"""Build a small volume example (NIfTI train/ and generated/ folders) for ``scan --unit volume``.

Every volume is read as RAS, resampled to 3 mm and centre-cropped or padded to one 64x76x64 grid.
Training: pseudo-subjects of ``deepssim.training.synthetic`` and the bundled real MNI T1 template
and ITK KmeansTest T1 volume. Generated: a rigidly moved, noised copy of a training volume, a
held-out subject with a slab of 12 axial slices copied from a training volume, and a held-out
subject. Seeded and deterministic; ``truth.csv`` says which is which. ``benchmarks/volumes.py``
builds its larger set from the same pieces.

    PYTHONPATH=src python data/build_volume_example.py [--out build/volume-example]
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

SOURCES = Path(__file__).resolve().parent / "sources"
GRID = (64, 76, 64)  # 192 x 228 x 192 mm: heads fit with a margin and stay in view when moved
SPACING = (3.0, 3.0, 3.0)
SEED = 20261203


def fit_grid(volume: np.ndarray) -> np.ndarray:
    """Centre crop or pad (with the volume's minimum) to GRID."""
    out = np.full(GRID, float(volume.min()))
    source, target = [], []
    for n, m in zip(volume.shape, GRID, strict=True):
        start = abs(n - m) // 2
        source.append(slice(start, start + m) if n >= m else slice(0, n))
        target.append(slice(0, m) if n >= m else slice(start, start + n))
    out[tuple(target)] = volume[tuple(source)]
    return out


def synthetic(seed: int) -> np.ndarray:
    """A pseudo-subject (1.5 mm RAS grid) on the example's grid."""
    from deepssim.io.orientation import resample
    from deepssim.training.synthetic import synthetic_volume

    volume, _ = synthetic_volume(seed)
    return fit_grid(resample(volume.astype(np.float64), (1.5, 1.5, 1.5), SPACING)[0])


def real(name: str) -> np.ndarray:
    """A bundled NIfTI volume on the example's grid."""
    from deepssim.io.orientation import read_canonical

    return fit_grid(read_canonical(SOURCES / name, SPACING).data)


def rigid(volume: np.ndarray, rng: np.random.Generator, degrees: float = 10, voxels: float = 3) -> np.ndarray:
    """Rotated about each axis (uniform within +-degrees) and shifted (within +-voxels) about the
    centre, in one cubic resampling (as a generator's augmentation would draw it), by scipy."""
    from scipy.spatial.transform import Rotation

    matrix = Rotation.from_euler("xyz", rng.uniform(-degrees, degrees, size=3), degrees=True).as_matrix()
    centre = (np.asarray(volume.shape) - 1) / 2
    shift = rng.uniform(-voxels, voxels, size=3)
    # output voxel o samples the input at matrix @ (o - centre - shift) + centre
    offset = centre - matrix @ (centre + shift)
    return ndimage.affine_transform(volume, matrix, offset=offset, order=3, mode="nearest")


def noisy(volume: np.ndarray, rng: np.random.Generator, level: float = 0.02) -> np.ndarray:
    return volume + rng.normal(0, level * np.ptp(volume), volume.shape)


def with_slab(host: np.ndarray, source: np.ndarray, first: int, slices: int = 12) -> np.ndarray:
    """``host`` with axial slices first..first+slices-1 taken from ``source``."""
    out = host.copy()
    out[:, :, first : first + slices] = source[:, :, first : first + slices]
    return out


def save(folder: Path, name: str, volume: np.ndarray) -> None:
    import nibabel as nib

    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(folder / f"{name}.nii.gz"))


def write_truth(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["generated_key", "kind", "source", "slab"])
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/volume-example")
    args = parser.parse_args()
    out = Path(args.out)
    train_dir, generated_dir = out / "train", out / "generated"
    for folder in (train_dir, generated_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    train = {f"synth-{s:02d}": synthetic(s) for s in range(3)}
    train["real-mni"] = real("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    train["real-kmeans"] = real("KmeansTest_T1UCharRaw.nii.gz")
    for name, volume in train.items():
        save(train_dir, name, volume)
    save(generated_dir, "gen-copy", noisy(rigid(train["real-mni"], rng), rng, 0.01))
    save(generated_dir, "gen-slab", with_slab(synthetic(100), train["synth-01"], 24))
    save(generated_dir, "gen-other", synthetic(101))
    write_truth(
        out / "truth.csv",
        [
            {"generated_key": "gen-copy", "kind": "copy: rigid + noise", "source": "real-mni", "slab": ""},
            {"generated_key": "gen-slab", "kind": "partial copy", "source": "synth-01", "slab": "24-35"},
            {"generated_key": "gen-other", "kind": "different subject", "source": "", "slab": ""},
        ],
    )
    print(f"{out}: {len(train)} training volumes, 3 generated volumes, truth.csv")


if __name__ == "__main__":
    main()
