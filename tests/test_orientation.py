"""Volumes read in one orientation (closest canonical, RAS+), sliced by anatomical plane, optionally
resampled to one spacing; mixed sets get a one-line note."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from deepssim.errors import DeepSSIMError
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.io.orientation import parse_spacing, read_canonical

SPACING = (1.0, 1.5, 2.0)


def _volume(rng, shape=(22, 26, 20)):
    data = rng.normal(size=shape).cumsum(0).cumsum(1).cumsum(2)
    return data - data.min() + 1.0


def stored_differently(data, affine, perm, flips):
    """The same volume stored with voxel axes permuted (stored axis k = original axis perm[k]) and
    flipped (flips[k]), with the affine changed so every voxel keeps its place in the world."""
    stored = np.transpose(data, perm)
    to_original = np.zeros((4, 4))
    to_original[3, 3] = 1
    for k, axis in enumerate(perm):
        if flips[k]:
            stored = np.flip(stored, axis=k)
            to_original[axis, k] = -1
            to_original[axis, 3] = data.shape[axis] - 1
        else:
            to_original[axis, k] = 1
    return np.ascontiguousarray(stored), affine @ to_original


def test_permuted_and_flipped_storage_gives_the_same_slices(tmp_path, rng):
    data = _volume(rng)
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ras.nii.gz")
    other = tmp_path / "other"
    other.mkdir()
    stored, moved = stored_differently(data, affine, (2, 0, 1), (True, False, True))
    image = nib.Nifti1Image(stored, moved)
    assert nib.aff2axcodes(image.affine) == ("I", "R", "P")
    nib.save(image, other / "ras.nii.gz")
    for plane, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        options = LoadOptions(plane=plane, min_foreground=0)
        reference = ImageSet.from_paths(tmp_path / "ras.nii.gz", options)
        turned = ImageSet.from_paths(other, options)
        assert reference.keys == turned.keys and len(reference) == data.shape[axis]
        np.testing.assert_array_equal(reference.read(), turned.read())
        np.testing.assert_array_equal(reference.read(3, 4)[0], np.take(data, 3, axis=axis))
    volume = read_canonical(other / "ras.nii.gz")
    np.testing.assert_array_equal(volume.data, data)
    assert volume.spacing == SPACING and volume.stored_as == "IRP"
    # the legacy voxel axis slices as stored
    legacy = ImageSet.from_paths(other, LoadOptions(axis=0, min_foreground=0))
    np.testing.assert_array_equal(legacy.read(0, 1)[0], stored[0])


def test_mixed_orientations_and_spacings_get_one_note_and_spacing_resamples(tmp_path, rng):
    data = _volume(rng, (20, 24, 16))
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / "a.nii.gz")
    stored, moved = stored_differently(data, np.diag([1.0, 1.0, 2.0, 1.0]), (1, 0, 2), (False, True, False))
    nib.save(nib.Nifti1Image(stored, moved), tmp_path / "b.nii.gz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageSet.from_paths(tmp_path, LoadOptions(min_foreground=0, size=(24, 24)))
    notes = [str(w.message) for w in caught if "mix" in str(w.message)]
    assert len(notes) == 1 and "RAS" in notes[0] and "--spacing" in notes[0]
    with pytest.warns(UserWarning, match="orientations ALS, RAS"):
        resampled = ImageSet.from_paths(tmp_path, LoadOptions(min_foreground=0, spacing=(1.0, 1.0, 2.0)))
    b_slices = [k for k in resampled.keys if k.startswith("b#")]
    a_slices = [k for k in resampled.keys if k.startswith("a#")]
    assert (len(a_slices), len(b_slices)) == (8, 16)  # a: 16 slices of 1 mm -> 8 of 2 mm; b has 2 mm
    assert resampled.shape == (20, 24)


def test_parse_spacing_and_bad_plane(tmp_path, rng):
    assert parse_spacing("1") == (1.0, 1.0, 1.0) and parse_spacing("1x1x2.5") == (1.0, 1.0, 2.5)
    for bad in ("0", "1x2", "a"):
        with pytest.raises(DeepSSIMError, match="--spacing"):
            parse_spacing(bad)
    nib.save(nib.Nifti1Image(_volume(rng, (10, 10, 10)), np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(DeepSSIMError, match="--plane"):
        ImageSet.from_paths(tmp_path, LoadOptions(plane="oblique"))
