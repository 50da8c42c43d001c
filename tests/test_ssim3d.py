"""Exact 3D SSIM: scikit-image's structural_similarity on 3D arrays under the paper's rule."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import structural_similarity

import deepssim
from deepssim.errors import DeepSSIMError
from deepssim.ssim.volume import ssim3d, ssim3d_map, ssim3d_profile
from tests.helpers import SOURCES


def reference(a, b):
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    return structural_similarity(za, zb, data_range=za.max() - za.min())


@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_equals_scikit_image_on_real_volumes_of_odd_sizes(backend, rng):
    volume = np.asarray(nib.load(SOURCES / "KmeansTest_T1UCharRaw.nii.gz").get_fdata())
    a = volume[40:73, 50:87, 20:49]  # 33 x 37 x 29
    noisy = a + rng.normal(0, 12, a.shape)
    other = volume[45:78, 48:85, 22:51]
    for b in (noisy, other, a):
        value, profile = ssim3d_profile(a, b, backend=backend)
        assert value == pytest.approx(reference(a, b), abs=1e-9)
        assert profile.shape == (a.shape[0] - 6,)
    small = np.asarray(nib.load(SOURCES / "anatomical.nii").get_fdata())  # 33 x 41 x 25, real
    shifted = np.roll(small, 2, axis=1)
    assert ssim3d_profile(small, shifted, backend=backend)[0] == pytest.approx(
        reference(small, shifted), abs=1e-9
    )


def test_public_ssim_takes_volumes_and_the_map_matches(rng):
    a = rng.normal(size=(9, 11, 8)).cumsum(0)
    b = a + rng.normal(size=a.shape)
    assert deepssim.ssim(a, b) == pytest.approx(reference(a, b), abs=1e-9)
    assert ssim3d_map(a, b).mean() == pytest.approx(ssim3d(a, b), abs=1e-12)
    assert ssim3d_map(a, b).shape == (3, 5, 2)


def test_bad_volumes_are_clean_errors(rng):
    a = rng.normal(size=(10, 10, 10))
    with pytest.raises(DeepSSIMError, match="constant"):
        ssim3d(np.ones((8, 8, 8)), a[:8, :8, :8])
    bad = a.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(DeepSSIMError, match="NaN"):
        ssim3d(a, bad)
    with pytest.raises(DeepSSIMError, match="one shape"):
        ssim3d(a, a[:9])
    with pytest.raises(DeepSSIMError, match="7x7x7"):
        ssim3d(a[:6], a[:6])
    with pytest.raises(DeepSSIMError, match="3D"):
        ssim3d(a[0], a[0])
