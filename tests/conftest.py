"""Shared fixtures: small images on disk in every supported format, made by the tests (plain helpers
are in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import smooth_image, write_dicom


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
