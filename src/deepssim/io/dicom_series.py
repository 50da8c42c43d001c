"""A folder of DICOM slices read as one 3D volume in the canonical orientation of NIfTI volumes.

The files of one folder (not its subfolders) are one series: they must share SeriesInstanceUID.
The slices are sorted by their position along the slice normal (the cross product of the row and
column direction cosines of ImageOrientationPatient), and the voxel-to-patient affine is built from
ImageOrientationPatient, the first slice's ImagePositionPatient, PixelSpacing and the spacing of
consecutive slice positions. DICOM's patient coordinates are LPS (x towards the subject's Left,
y Posterior, z Superior); the affine is converted to RAS (x and y negated) and the volume is
permuted and flipped into nibabel's closest canonical orientation (RAS+) by
:func:`deepssim.io.orientation.to_canonical`, exactly as a NIfTI volume is, so a series and a
NIfTI file of the same head give the same array. Pixels are rescaled (slope, intercept) as in the
2D reader; a MONOCHROME1 series is inverted over the whole volume, so its slices stay comparable.
Slices must be evenly spaced; the slice direction is taken along the normal (a gantry tilt's shear
is not corrected). Files named DICOMDIR (an index, not a slice) are not part of any series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.load import dicom_pixels, is_dicom_file, is_monochrome1
from deepssim.io.orientation import Volume, canonical_axes, resample, to_canonical

# Consecutive slice positions may differ from their mean spacing by this fraction of it (plus a
# thousandth of a mm for rounding in the headers) before the series counts as unevenly spaced.
SPACING_TOLERANCE = 0.01
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (hidden files and DICOMDIR left out), sorted."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and is_dicom_file(p)
    )


@dataclass(frozen=True)
class _Geometry:
    order: list[int]  # the files' indices sorted by position along the slice normal
    affine: np.ndarray  # voxel (row, column, slice) -> RAS mm
    zooms: tuple[float, float, float]  # mm along (row, column, slice) voxel axes
    shape: tuple[int, int, int]  # (rows, columns, slices) as stored


def read_series(folder: Path, spacing: tuple[float, float, float] | None = None) -> Volume:
    """The DICOM series in ``folder`` as one canonical (RAS+) volume, resampled to ``spacing`` (mm)
    if given. Raises :class:`DeepSSIMError` for several series, missing or inconsistent geometry
    tags, multi-frame files and unevenly spaced slices."""
    import pydicom

    folder = Path(folder)
    files = series_files(folder)
    datasets = [_read(pydicom, path, stop_before_pixels=False) for path in files]
    geometry = _geometry(folder, files, datasets)
    slices = []
    for i in geometry.order:
        try:
            pixels = dicom_pixels(datasets[i])
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for bad pixel data
            raise DeepSSIMError(f"{files[i]}: cannot read its pixels ({error})") from None
        if pixels.shape != geometry.shape[:2]:
            raise DeepSSIMError(
                f"{files[i]}: pixels of shape {pixels.shape}, its header says {geometry.shape[:2]}"
            )
        slices.append(pixels)
    data = np.stack(slices, axis=-1)  # (rows, columns, slices)
    if any(is_monochrome1(d) for d in datasets):
        data = data.max() - data  # MONOCHROME1 stores inverted gray levels
    data, zooms, codes = to_canonical(data, geometry.affine, geometry.zooms)
    if spacing is not None:
        data, zooms = resample(data, zooms, spacing)
    return Volume(data, zooms, codes)


def series_geometry(folder: Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(canonical shape, voxel size in mm along R, A, S) of the series in ``folder``, from the
    headers alone (no pixel data read)."""
    import pydicom

    folder = Path(folder)
    files = series_files(folder)
    datasets = [_read(pydicom, path, stop_before_pixels=True) for path in files]
    geometry = _geometry(folder, files, datasets)
    return canonical_axes(geometry.shape, geometry.affine), canonical_axes(geometry.zooms, geometry.affine)


def _read(pydicom, path: Path, stop_before_pixels: bool):
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for unreadable files
        raise DeepSSIMError(f"{path}: not a readable DICOM file ({error})") from None


def _geometry(folder: Path, files: list[Path], datasets: list) -> _Geometry:
    """Sort the slices and build the affine, refusing what does not make one evenly spaced volume."""
    if not files:
        raise DeepSSIMError(f"{folder}: no DICOM files in this folder")
    series = {str(getattr(d, "SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise DeepSSIMError(
            f"{folder}: {len(series)} DICOM series in one folder (different SeriesInstanceUID); "
            "put each series in its own folder: a series folder is one volume"
        )
    for path, dataset in zip(files, datasets, strict=True):
        missing = [
            tag
            for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
            if getattr(dataset, tag, None) in (None, "")
        ]
        if missing:
            raise DeepSSIMError(
                f"{path}: no {', '.join(missing)}; a DICOM series is read as a volume only with the "
                "geometry of every slice"
            )
        if int(getattr(dataset, "NumberOfFrames", 1) or 1) > 1:
            raise DeepSSIMError(
                f"{path}: a multi-frame file ({int(dataset.NumberOfFrames)} frames) in a series folder; "
                "a series volume is read from single-slice files"
            )
    first = datasets[0]
    orientation = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    pixel_spacing = tuple(float(v) for v in first.PixelSpacing)
    shape = (int(first.Rows), int(first.Columns))
    if orientation.shape != (6,) or len(pixel_spacing) != 2:
        raise DeepSSIMError(f"{files[0]}: ImageOrientationPatient needs 6 values and PixelSpacing 2")
    for path, dataset in zip(files, datasets, strict=True):
        other = np.array([float(v) for v in dataset.ImageOrientationPatient], dtype=np.float64)
        if other.shape != (6,) or not np.allclose(other, orientation, atol=1e-4):
            raise DeepSSIMError(
                f"{path}: its ImageOrientationPatient differs from {files[0]}'s; the slices of one "
                "volume share one orientation"
            )
        if tuple(float(v) for v in dataset.PixelSpacing) != pixel_spacing:
            raise DeepSSIMError(f"{path}: its PixelSpacing differs from {files[0]}'s")
        if (int(dataset.Rows), int(dataset.Columns)) != shape:
            raise DeepSSIMError(
                f"{path}: {dataset.Rows}x{dataset.Columns} pixels, {files[0]} has {shape[0]}x{shape[1]}"
            )
    row_cosines, column_cosines = orientation[:3], orientation[3:]
    normal = np.cross(row_cosines, column_cosines)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3) or min(pixel_spacing) <= 0:
        raise DeepSSIMError(
            f"{files[0]}: ImageOrientationPatient is not two orthogonal unit vectors, or PixelSpacing "
            "is not positive"
        )
    origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets], dtype=np.float64)
    if origins.shape[1:] != (3,):
        raise DeepSSIMError(f"{folder}: ImagePositionPatient needs 3 values in every slice")
    positions = origins @ normal
    order = [int(i) for i in np.argsort(positions, kind="stable")]
    if len(order) < 2:
        raise DeepSSIMError(
            f"{folder}: a single DICOM slice, not a volume; scan slices without --unit volume"
        )
    steps = np.diff(positions[order])
    step = float(steps.mean())
    if steps.min() <= 1e-3 or np.abs(steps - step).max() > SPACING_TOLERANCE * step + 1e-3:
        at = int(np.argmax(np.abs(steps - step))) if steps.min() > 1e-3 else int(np.argmin(steps))
        raise DeepSSIMError(
            f"{folder}: slices are not evenly spaced along their normal (from {step:.4g} mm on average "
            f"to {steps[at]:.4g} mm between {files[order[at]].name} and {files[order[at + 1]].name}); "
            "a missing slice, two slices at one position (several echoes or times) or a variable "
            "spacing: read as a volume only an evenly spaced series"
        )
    step = round(step, 6)
    row_spacing, column_spacing = pixel_spacing  # PixelSpacing: between rows, then between columns
    lps = np.eye(4)
    # pixel_array is (rows, columns): the row index moves along the column cosines, the column
    # index along the row cosines (ImageOrientationPatient's first three values)
    lps[:3, 0] = column_cosines * row_spacing
    lps[:3, 1] = row_cosines * column_spacing
    lps[:3, 2] = normal * step
    lps[:3, 3] = origins[order[0]]
    return _Geometry(
        order=order,
        affine=LPS_TO_RAS @ lps,
        zooms=(row_spacing, column_spacing, step),
        shape=(shape[0], shape[1], len(order)),
    )
