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
) -> None:
    """Write a minimal valid DICOM file (uint16 pixels, optional multi-frame)."""
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
    ds.save_as(path, enforce_file_format=True)


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
