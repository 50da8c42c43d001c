"""Helpers the tests share (fixtures stay in conftest.py): where the bundled data are, small images
with structure, a minimal DICOM writer, the independent SSIM reference and the example's truth."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from skimage.metrics import structural_similarity

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "data" / "example"
SOURCES = REPO / "data" / "sources"


def smooth_image(rng: np.random.Generator, shape=(32, 28)) -> np.ndarray:
    """A random image with spatial structure (cumulative sums), not white noise."""
    return rng.normal(size=shape).cumsum(0).cumsum(1)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    photometric: str = "MONOCHROME2",
    **tags,
) -> None:
    """Write a minimal valid DICOM file (uint16 pixels, optional multi-frame); ``tags`` are further
    attributes by keyword (e.g. ImagePositionPatient=[0, 0, 0])."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    spacing=(1.0, 1.0, 1.0),
    row=(1, 0, 0),
    column=(0, 1, 0),
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    file_order=None,
    omit=(),
    name: str = "im",
) -> Path:
    """Write ``volume`` (RAS+ voxels: voxel (i, j, k) lies at RAS (i, j, k) * ``spacing`` mm) as a
    DICOM series in ``folder``, one file per slice, its pixel rows and columns running along the
    LPS direction cosines ``column`` and ``row`` (axis-aligned; ImageOrientationPatient = row +
    column). Worked out here from the geometry alone, independently of the package. ``file_order``
    renames the slices (file n holds the slice at position file_order[n]); ``omit`` drops tags."""
    folder.mkdir(parents=True, exist_ok=True)
    row, column = np.asarray(row, dtype=float), np.asarray(column, dtype=float)
    normal = np.cross(row, column)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])

    def ras_axis(vector):  # the RAS axis an LPS direction runs along, and whether it runs towards +
        axis = int(np.argmax(np.abs(vector)))
        return axis, vector[axis] * lps_to_ras[axis] > 0

    (rows_axis, rows_up), (columns_axis, columns_up), (slices_axis, slices_up) = (
        ras_axis(column),
        ras_axis(row),
        ras_axis(normal),
    )
    stored = np.transpose(volume, (rows_axis, columns_axis, slices_axis))  # stored[row, column, slice]
    for axis, up in enumerate((rows_up, columns_up, slices_up)):
        if not up:
            stored = np.flip(stored, axis=axis)
    values = (stored - intercept) / slope
    assert np.array_equal(values, np.round(values)) and values.min() >= 0, "pixels must be uint16"
    count = stored.shape[2]
    file_order = list(range(count)) if file_order is None else list(file_order)
    for n, k in enumerate(file_order):
        corner = np.zeros(3)  # the RAS voxel index of pixel (0, 0) of slice k
        corner[rows_axis] = 0 if rows_up else volume.shape[rows_axis] - 1
        corner[columns_axis] = 0 if columns_up else volume.shape[columns_axis] - 1
        corner[slices_axis] = k if slices_up else volume.shape[slices_axis] - 1 - k
        position = corner * np.asarray(spacing) * lps_to_ras
        tags = {
            "SeriesInstanceUID": series_uid,
            "ImageOrientationPatient": [*row.tolist(), *column.tolist()],
            "ImagePositionPatient": [float(v) + 0.0 for v in position],
            "PixelSpacing": [spacing[rows_axis], spacing[columns_axis]],
            "SliceThickness": spacing[slices_axis],
        }
        tags = {key: value for key, value in tags.items() if key not in omit}
        write_dicom(folder / f"{name}{n:03d}.dcm", values[:, :, k], slope, intercept, **tags)
    return folder


def reference_ssim(train: np.ndarray, generated: np.ndarray) -> float:
    """The label's definition through scikit-image: both images z-scored, data range from the
    training one."""
    za = (train - train.mean()) / train.std()
    zb = (generated - generated.mean()) / generated.std()
    return structural_similarity(za, zb, data_range=za.max() - za.min())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def planted() -> dict[str, dict]:
    """The bundled example's planted truth: generated key -> {kind, source_train_key}."""
    return {row["generated_key"]: row for row in read_csv(EXAMPLE / "planted.csv")}


# The bundled example's training images, grouped by subject.
SUBJECT_GROUPS = r"^(ants_r[0-9]+|kmeans|mni|itk_[a-z0-9]+|dwi)"


def phantom_volume(seed: int, shape=(36, 36, 36)) -> np.ndarray:
    """A head-like test volume: an ellipsoid of smooth random texture on a dark background, with a
    margin so that small rigid moves keep it in view. Different seeds are different 'subjects'."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    texture = (texture - texture.min()) / np.ptp(texture)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    centre = rng.uniform(-0.06, 0.06, size=3)[:, None, None, None]
    radii = rng.uniform(0.6, 0.78, size=3)[:, None, None, None]
    inside = (((grid - centre) / radii) ** 2).sum(axis=0) < 1
    return np.where(inside, 0.1 + texture, 0.0)


def write_nifti(path: Path, volume: np.ndarray, affine=None, zooms=(1.0, 1.0, 1.0)) -> Path:
    """A NIfTI file of ``volume``; ``affine`` default RAS with voxel size ``zooms``."""
    import nibabel as nib

    affine = np.diag([*zooms, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine), str(path))
    return path
