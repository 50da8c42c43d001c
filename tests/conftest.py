"""Shared fixtures: small images on disk in every supported format, made by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def mixed_folder(tmp_path: Path, rng) -> Path:
    """A folder with one valid image in each supported format, all 32x28."""
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    base = smooth_image(rng)
    scaled = (base - base.min()) / (base.max() - base.min())
    Image.fromarray((scaled * 255).astype(np.uint8)).save(root / "gray8.png")
    Image.fromarray((scaled * 65535).astype(np.uint16)).save(root / "sub" / "gray16.png")
    rgb = np.stack([scaled, scaled[::-1], scaled[:, ::-1]], -1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(root / "colour.jpg", quality=95)
    Image.fromarray((rgb * 255).astype(np.uint8)).convert("RGBA").save(root / "alpha.png")
    Image.fromarray((scaled * 255).astype(np.uint8)).save(root / "page.tif")
    Image.fromarray((scaled * 255).astype(np.uint8)).save(root / "bitmap.bmp")
    np.save(root / "array.npy", base)
    write_dicom(root / "scan.dcm", (scaled * 4000).astype(np.uint16), slope=2.0, intercept=-100)
    (root / "notes.txt").write_text("not an image")
    return root
