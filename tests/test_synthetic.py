"""Domain-randomised pseudo-subjects: seeded, well-formed, varied in contrast, and anatomically
coherent (neighbouring slices of one subject look more alike than the same slice of two)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from deepssim.training import synthetic as ss


@pytest.fixture(scope="module")
def slices_seed3():
    return ss.synthetic_slices(3, 24, size=(96, 96))


def test_same_seed_same_arrays_and_different_seeds_differ(slices_seed3):
    ss._subject.cache_clear()  # rebuild the subject from scratch, not from the cache
    again = ss.synthetic_slices(3, 24, size=(96, 96))
    for a, b in zip(slices_seed3, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = ss.synthetic_slices(4, 24, size=(96, 96))
    assert not np.allclose(slices_seed3[0], other[0])


def test_shapes_finite_non_constant_and_runs(slices_seed3):
    images, axis, index = slices_seed3
    assert images.shape == (24, 96, 96) and images.dtype == np.float32
    assert axis.shape == index.shape == (24,)
    assert np.isfinite(images).all()
    assert (images.reshape(24, -1).std(axis=1) > 1e-3).all()
    assert sorted(set(axis.tolist())) == [0, 1, 2] and np.bincount(axis).tolist() == [8, 8, 8]
    # Runs of consecutive indices: every image has a neighbour at index +-1 on the same axis.
    same = (axis[1:] == axis[:-1]) & (np.diff(index) == 1)
    has_neighbour = np.zeros(24, bool)
    has_neighbour[1:] |= same
    has_neighbour[:-1] |= same
    assert has_neighbour.all()


def test_synthetic_subjects_groups_and_volume():
    images, groups, index = ss.synthetic_subjects(2, 6, seed=1, size=(64, 64))
    assert images.shape == (12, 64, 64) and len(groups) == 12 and index.shape == (12,)
    assert groups[0] == "synth-0000/axis0" and groups[-1] == "synth-0001/axis2"
    volume, params = ss.synthetic_volume(5)
    assert volume.ndim == 3 and volume.dtype == np.float32 and np.isfinite(volume).all()
    assert volume.std() > 0 and {"contrast", "means", "scale", "acquisition"} <= set(params)


def test_contrast_really_varies_between_subjects():
    """WM is brighter than GM in some pseudo-subjects and darker in others, in the final image."""
    signs, modes = {}, set()
    for seed in range(12):
        volume, params = ss.synthetic_volume(seed)
        tissue = ss._subject(seed).tissue_half
        half = volume[::2, ::2, ::2]
        wm, gm = half[tissue["wm"] > 0.9].mean(), half[tissue["gm"] > 0.9].mean()
        drawn = params["means"]["wm"] - params["means"]["gm"]
        modes.add(params["contrast"])
        if abs(drawn) > 0.15:  # clear contrast: the image must follow the drawn tissue means
            assert np.sign(wm - gm) == np.sign(drawn), (seed, params["contrast"], wm, gm)
            signs[seed] = np.sign(drawn)
    assert 1 in signs.values() and -1 in signs.values()
    assert len(modes) >= 3


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    a = (a - a.min()) / (a.max() - a.min())
    b = (b - b.min()) / (b.max() - b.min())
    return structural_similarity(a, b, data_range=1.0)


def test_neighbouring_slices_more_alike_than_other_subjects_at_same_index():
    first = ss.synthetic_slices(11, 40, axes=(2,))
    second = ss.synthetic_slices(12, 40, axes=(2,))
    images, _, index = first
    pairs = [i for i in range(len(index) - 1) if index[i + 1] == index[i] + 1]
    neighbours = [_ssim(images[i], images[i + 1]) for i in pairs]
    shared = sorted(set(index.tolist()) & set(second[2].tolist()))
    assert len(shared) >= 5
    across = [_ssim(images[list(index).index(k)], second[0][list(second[2]).index(k)]) for k in shared]
    print(f"SSIM neighbours {np.mean(neighbours):.3f}, other subject same index {np.mean(across):.3f}")
    assert np.mean(neighbours) > np.mean(across) + 0.1, (np.mean(neighbours), np.mean(across))
