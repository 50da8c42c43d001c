"""Registered 3D SSIM (deepssim.ssim.registered3d) against independent references: copies moved by
scipy.ndimage.affine_transform (not warp_volume's torch code), with the transform written out here
from the documented convention, and the exact ssim3d of the unmoved pairs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from deepssim.errors import DeepSSIMError
from deepssim.ssim.registered3d import (
    Registration3DSettings,
    RigidTransform3D,
    register_volumes,
    warp_volume,
)
from deepssim.ssim.volume import ssim3d
from tests.helpers import SOURCES

SIZE, MARGIN = 40, 6
ROTATION, SHIFT = (8.0, -5.0, 6.0), (4.0, -3.0, 5.0)
# (4, -3, 5) after an 8 deg rotation needs more than 10% of 40 voxels to undo
SETTINGS = Registration3DSettings(max_shift_fraction=0.15)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _framed(data: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """``data`` smoothed (``sigma`` output voxels), resized into SIZE^3 with a background border of
    MARGIN voxels, so that moving it keeps the head in view."""
    inner = SIZE - 2 * MARGIN
    data = ndimage.gaussian_filter(data, sigma * np.array(data.shape) / inner)
    small = ndimage.zoom(data, inner / np.array(data.shape), order=1)
    out = np.full((SIZE,) * 3, float(small.min()))
    out[tuple(slice(MARGIN, MARGIN + n) for n in small.shape)] = small
    return out


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """The MNI T1 template, cut off-centre along the left-right axis (the template is symmetric, and
    a flipped copy must be told apart from the original)."""
    template = np.asarray(nib.load(SOURCES / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").get_fdata())
    return _framed(template[: int(template.shape[0] * 0.7)])


def _moved(volume, rotation_deg, shift, flips=()) -> np.ndarray:
    """Content at centred y goes to R2 R1 R0 D y + shift (the module's convention), by scipy."""

    def about(axis, degrees):
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        i, j = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m if axis != 1 else m.T  # about axis 1: z -> x is the right-handed sense

    forward = about(2, rotation_deg[2]) @ about(1, rotation_deg[1]) @ about(0, rotation_deg[0])
    forward = forward @ np.diag([-1.0 if a in flips else 1.0 for a in range(3)])
    back = np.linalg.inv(forward)
    centre = (np.array(volume.shape) - 1) / 2
    offset = centre - back @ (centre + np.asarray(shift))
    return ndimage.affine_transform(volume, back, offset, order=1, mode="constant", cval=volume.min())


def _noisy(volume, rng) -> np.ndarray:
    """Gaussian noise in two channels and the magnitude, as an MRI scanner's magnitude image."""
    sigma = 0.04 * volume.max()
    return np.hypot(volume + rng.normal(0, sigma, volume.shape), rng.normal(0, sigma, volume.shape))


def test_warp_matches_scipy_and_round_trips(volume):
    transform = RigidTransform3D((0,), ROTATION, SHIFT)
    moved = warp_volume(volume, transform, order=1)
    assert np.allclose(moved, _moved(volume, ROTATION, SHIFT, flips=(0,)), atol=1e-9 * volume.max())
    back = warp_volume(moved, transform.inverse())
    inner = (slice(12, -12),) * 3  # away from what left the frame
    assert np.abs(back - volume)[inner].max() < 0.1 * volume.max()
    assert ssim3d(volume, back) > 0.97
    # flips and whole-voxel shifts copy voxels, and the fill is the minimum unless given
    exact = warp_volume(volume, RigidTransform3D((0,), shift_vox=(2, 0, -1)), fill=-1.0)
    assert np.array_equal(exact[2:, :, :-1], volume[::-1][:-2, :, 1:])
    assert (exact[:2] == -1).all() and (exact[:, :, -1] == -1).all()
    assert warp_volume(volume, RigidTransform3D(rotation_deg=(0, 0, 1))).min() >= volume.min()


def test_rotated_and_shifted_copy_is_found(volume):
    moved = _moved(volume, ROTATION, SHIFT)
    found = register_volumes(volume, moved, SETTINGS)
    assert found.ssim_plain == pytest.approx(ssim3d(volume, moved))
    assert found.ssim_plain < 0.75
    assert found.ssim_registered > ssim3d(volume, volume) - 0.02
    assert found.ssim_registered == pytest.approx(ssim3d(volume, warp_volume(moved, found.transform)))
    truth = RigidTransform3D((), ROTATION, SHIFT).inverse()
    assert np.allclose(found.transform.rotation_deg, truth.rotation_deg, atol=1.5)
    assert np.allclose(found.transform.shift_vox, truth.shift_vox, atol=0.5)


def test_noisy_moved_copy_scores_as_the_noisy_copy(volume):
    # the scanner's noise is not moved with the anatomy: noise added to the moved copy (noise moved
    # with it is interpolated twice and is no longer the unmoved copy's noise)
    unmoved = ssim3d(volume, _noisy(volume, np.random.default_rng(0)))
    moved = _noisy(_moved(volume, ROTATION, SHIFT), np.random.default_rng(1))
    found = register_volumes(volume, moved, SETTINGS)
    assert found.ssim_plain < unmoved - 0.2
    assert found.ssim_registered == pytest.approx(unmoved, abs=0.02)


def test_left_right_flip_needs_flips(volume):
    flipped = _moved(volume, (0, 0, 0), (0, 0, 0), flips=(0,))
    with_flips = register_volumes(volume, flipped)  # default: the left-right axis (0)
    assert with_flips.transform.flips == (0,)
    assert with_flips.ssim_registered > 0.99
    without = register_volumes(volume, flipped, Registration3DSettings(flips=()))
    assert without.transform.flips == ()
    assert without.ssim_registered < 0.8


def test_different_volumes_stay_different(volume):
    other = np.asarray(nib.load(SOURCES / "anatomical.nii").get_fdata())
    found = register_volumes(volume, _framed(other, sigma=0.5))
    assert found.ssim_registered <= 0.85
    assert found.ssim_registered >= found.ssim_plain


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_rotation_deg": -1},
        {"max_rotation_deg": float("nan")},
        {"max_shift_fraction": 0.7},
        {"flips": (3,)},
        {"flips": (0, 0)},
        {"flips": "x"},
        {"coarse_size": 4},
        {"final": 0},
        {"device": "nowhere"},
    ],
)
def test_settings_are_validated(kwargs):
    with pytest.raises(DeepSSIMError):
        Registration3DSettings(**kwargs)


def test_bad_volumes_are_refused(volume):
    with pytest.raises(DeepSSIMError, match="one shape"):
        register_volumes(volume, volume[:-1])
    with pytest.raises(DeepSSIMError, match="constant"):
        register_volumes(volume, np.zeros_like(volume))
    with pytest.raises(DeepSSIMError, match="3D"):
        warp_volume(volume[0], RigidTransform3D())
