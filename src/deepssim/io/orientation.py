"""Volumes in one orientation: every NIfTI volume is read into nibabel's closest canonical
orientation (RAS+: voxel axes 0, 1, 2 run towards the subject's Right, Anterior and Superior as
closely as the affine allows, by permuting and flipping axes, never interpolating), so a plane
named by its anatomy is the same plane whichever way a file stores it. Optionally resampled to
a common voxel spacing (trilinear).

``PLANES`` names the canonical axis normal to each plane: slicing "axial" takes slices along S.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError

PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the canonical (RAS) axis normal to each plane
CANONICAL = "RAS"


@dataclass(frozen=True)
class Volume:
    """One 3D volume in canonical (RAS+) orientation.

    data: (X, Y, Z) float64; spacing: voxel size in mm along each canonical axis;
    stored_as: the orientation codes of the file's voxel axes (e.g. "LSA").
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    stored_as: str


def parse_spacing(text: str | float | Iterable[float] | None) -> tuple[float, float, float] | None:
    """'1' -> (1, 1, 1); '1x1x2' -> (1, 1, 2); a number or three numbers pass through."""
    if text is None:
        return None
    if isinstance(text, int | float):
        values = [float(text)] * 3
    elif isinstance(text, str):
        try:
            values = [float(part) for part in text.lower().split("x")]
        except ValueError:
            raise DeepSSIMError(
                f"--spacing must be MM or XxYxZ in mm (e.g. 1 or 1x1x2), not {text!r}"
            ) from None
        values = values * 3 if len(values) == 1 else values
    else:
        values = [float(v) for v in text]
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise DeepSSIMError(f"--spacing needs one or three positive sizes in mm, not {text!r}")
    return (values[0], values[1], values[2])


def plane_axis(plane: str) -> int:
    """The canonical axis normal to ``plane``."""
    if plane not in PLANES:
        raise DeepSSIMError(f"--plane must be one of {', '.join(PLANES)}, not {plane!r}")
    return PLANES[plane]


def read_canonical(path: Path, spacing: tuple[float, float, float] | None = None) -> Volume:
    """A NIfTI file's 3D volume in canonical orientation, resampled to ``spacing`` (mm) if given.
    Trailing singleton dimensions are dropped; a 2D file raises (it has no orientation to fix)."""
    import nibabel as nib

    image = nib.load(path)
    data = np.asarray(image.get_fdata(dtype=np.float64))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        what = "a 2D image" if data.ndim == 2 else f"shape {data.shape}"
        raise DeepSSIMError(f"{path}: expected a 3D volume, got {what}; split 4D series first")
    data, zooms, codes = to_canonical(data, image.affine, image.header.get_zooms()[:3])
    if spacing is not None:
        data, zooms = resample(data, zooms, spacing)
    return Volume(data, zooms, codes)


def to_canonical(data: np.ndarray, affine: np.ndarray, zooms) -> tuple[np.ndarray, tuple, str]:
    """(data, zooms) permuted and flipped into the closest canonical orientation, and the codes of
    the stored orientation. Pure index operations: the voxel values are untouched."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    codes = "".join(c or "?" for c in nib.orientations.ornt2axcodes(ornt))
    canonical = nib.orientations.apply_orientation(data, ornt)
    spacing = canonical_axes([float(z) for z in zooms], affine)
    return np.ascontiguousarray(canonical), spacing, codes


def canonical_axes(values, affine) -> tuple:
    """Per-axis values of the stored voxel axes (sizes, voxel sizes) in canonical (RAS) axis order."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    out = [None] * len(ornt)
    for stored_axis, (target_axis, _) in enumerate(ornt):
        out[int(target_axis)] = values[stored_axis]
    return tuple(out)


def resampled_shape(shape, zooms, spacing) -> tuple[int, ...]:
    """The grid :func:`resample` makes of a canonical volume of ``shape`` and voxel size ``zooms``."""
    factors = [float(z) / s for z, s in zip(zooms, spacing, strict=True)]
    if np.allclose(factors, 1.0, rtol=1e-6):
        return tuple(int(n) for n in shape)
    return tuple(max(1, int(round(n * f))) for n, f in zip(shape, factors, strict=True))


def resample(data: np.ndarray, zooms, spacing) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Trilinear resampling of a canonical volume from voxel size ``zooms`` to ``spacing`` (mm)."""
    from scipy import ndimage

    zooms = tuple(float(z) for z in zooms)
    shape = resampled_shape(data.shape, zooms, spacing)
    if np.allclose([z / s for z, s in zip(zooms, spacing, strict=True)], 1.0, rtol=1e-6):
        return data, zooms
    real = [n / m for n, m in zip(shape, data.shape, strict=True)]
    out = ndimage.zoom(data, real, order=1, mode="nearest", grid_mode=True)
    return out, tuple(float(z / f) for z, f in zip(zooms, real, strict=True))


def geometry(path: Path) -> tuple[str, tuple[float, ...]]:
    """(stored orientation codes, voxel sizes in canonical order) from the header alone."""
    import nibabel as nib

    image = nib.load(path)
    codes = "".join(c or "?" for c in nib.aff2axcodes(image.affine))
    zooms = [round(float(z), 4) for z in image.header.get_zooms()]
    return codes, canonical_axes(zooms, image.affine)[:3]


def note_mixed_geometry(paths: Iterable[Path], spacing=None, what: str = "volumes") -> dict:
    """Warn once (one line) when NIfTI ``paths`` mix stored orientations or voxel sizes; return
    {path: (codes, spacing)}. Orientation is always made canonical; voxel sizes are made equal
    only with ``--spacing``."""
    found = {}
    for path in paths:
        try:
            found[path] = geometry(path)
        except Exception:  # noqa: BLE001 - unreadable files are reported by the reader itself
            continue
    orientations = sorted({codes for codes, _ in found.values()})
    spacings = sorted({zooms for _, zooms in found.values()})
    notes = []
    if len(orientations) > 1:
        notes.append(f"orientations {', '.join(orientations)} (all read as {CANONICAL})")
    if len(spacings) > 1 and spacing is None:
        shown = ", ".join("x".join(f"{v:g}" for v in zooms) for zooms in spacings[:4])
        notes.append(f"voxel sizes {shown} mm (pass --spacing MM to resample to one)")
    if notes:
        warnings.warn(f"these {what} mix {' and '.join(notes)}", stacklevel=3)
    return found
