"""Registered SSIM: finds flips, rotations and shifts of near-copies, and stays exact and unbiased.

References are independent of the module: scipy.ndimage makes the misaligned copies and
scikit-image's structural_similarity (on z-scored images) scores them.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from deepssim.errors import DeepSSIMError
from deepssim.ssim.registered import (
    RegistrationSettings,
    apply_transform,
    register_pairs,
    registered_ssim,
)
from tests.helpers import SOURCES, reference_ssim

VOLUME = SOURCES / "KmeansTest_T1UCharRaw.nii.gz"


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.asarray(nib.load(VOLUME).dataobj, dtype=np.float64)  # 128 x 128 x 62


@pytest.fixture(scope="module")
def near_copy(volume):
    """Slice 30, a noisy copy of it, and that copy flipped (cols), rotated 8 deg and shifted 5 px."""
    original = volume[:, :, 30]
    noisy = original + np.random.default_rng(0).normal(0, 5, original.shape)
    background = noisy.min()
    moved = ndimage.rotate(noisy[:, ::-1], 8, reshape=False, order=3, mode="constant", cval=background)
    moved = ndimage.shift(moved, (5, 0), order=3, mode="constant", cval=background)
    return original, noisy, moved


GEOMETRY_ONLY = RegistrationSettings(contrast=False)


def test_recovers_flipped_rotated_shifted_copy(near_copy):
    original, noisy, moved = near_copy
    before = reference_ssim(original, noisy)
    result = register_pairs(original[None], moved[None], settings=GEOMETRY_ONLY)
    assert result.ssim_plain[0] < before - 0.3
    assert abs(result.ssim_registered[0] - before) < 0.02
    assert result.flip[0] == "cols"
    assert abs(abs(result.rotation_deg[0]) - 8) < 0.5
    assert abs(np.hypot(*result.shift_px[0]) - 5) < 0.5
    assert abs(result.scale[0] - 1) < 0.02
    assert "flip=cols" in result.transform_text(0)


def test_recovers_a_contrast_changed_misaligned_copy(volume):
    """The evaluation protocol's misalignment: flip, rotation and a gamma change. Registration with
    contrast brings back the SSIM the copy had before both (here a mildly blurred copy)."""
    original = volume[:, :, 30]
    copy = ndimage.gaussian_filter(original, 0.6)
    before = reference_ssim(original, copy)
    changed = (copy / copy.max()) ** 0.6
    moved = ndimage.rotate(changed[::-1], -7, reshape=False, order=3, mode="constant", cval=changed.min())
    result = register_pairs(original[None], moved[None])
    geometric = register_pairs(original[None], moved[None], settings=GEOMETRY_ONLY)
    assert abs(result.ssim_registered[0] - before) < 0.02
    assert result.ssim_registered[0] > geometric.ssim_registered[0] + 0.02
    assert abs(result.gamma[0] - 1 / 0.6) < 0.25 and result.flip[0] == "rows"


def test_contrast_registration_leaves_other_slices_and_measures_noise_lift(near_copy, volume):
    """Matching the contrast does not make another slice a copy; on a noisy copy it lifts SSIM
    (quantile matching squashes background noise) by a bounded, documented amount."""
    original, noisy, _ = near_copy
    neighbour = volume[:, :, 34]
    both = register_pairs(np.stack([original, original]), np.stack([neighbour, noisy]))
    geometric = register_pairs(
        np.stack([original, original]), np.stack([neighbour, noisy]), settings=GEOMETRY_ONLY
    )
    assert both.ssim_registered[0] == pytest.approx(geometric.ssim_registered[0], abs=0.02)
    assert 0 <= both.ssim_registered[1] - geometric.ssim_registered[1] < 0.08


def test_score_is_exact_ssim_of_the_reported_transform(near_copy, volume):
    original, noisy, moved = near_copy
    flipped_shifted = np.roll(noisy[::-1], (3, -4), axis=(0, 1))
    generated = np.stack([moved, flipped_shifted, volume[:, :, 45]])
    result = register_pairs(np.stack([original] * 3), generated)
    assert result.flip[1] == "rows" and result.rotation_deg[1] == 0 and result.scale[1] == 1
    for i in range(3):
        warped = apply_transform(generated[i], **result.transform(i))
        assert abs(result.ssim_registered[i] - reference_ssim(original, warped)) < 1e-5
        assert abs(result.ssim_plain[i] - reference_ssim(original, generated[i])) < 1e-5


def test_never_below_plain_and_identity_is_exact(volume):
    rng = np.random.default_rng(1)
    train = np.stack([volume[:, :, k] for k in (20, 30, 40, 30)])
    generated = np.stack([volume[:, :, k] for k in (20, 45, 12, 31)])
    generated[1:] += rng.normal(0, 20, generated[1:].shape)
    result = register_pairs(train, generated)
    assert np.all(result.ssim_registered >= result.ssim_plain)
    assert abs(result.ssim_registered[0] - 1) < 1e-6 and abs(result.ssim_plain[0] - 1) < 1e-6
    assert result.flip[0] == "none" and result.rotation_deg[0] == 0 and result.scale[0] == 1
    assert np.all(result.shift_px[0] == 0)

    smooth = rng.normal(size=(6, 24, 20)).cumsum(1).cumsum(2)
    small = register_pairs(smooth, rng.normal(size=smooth.shape).cumsum(1).cumsum(2))
    assert np.all(small.ssim_registered >= small.ssim_plain)


def test_noisy_copy_is_not_inflated_by_interpolation(near_copy):
    """An aligned noisy copy keeps its plain SSIM: smoothing by resampling must not lift it."""
    original, noisy, _ = near_copy
    result = register_pairs(original[None], noisy[None], settings=GEOMETRY_ONLY)
    assert result.ssim_registered[0] == pytest.approx(result.ssim_plain[0], abs=1e-12)
    assert result.transform_text(0) == "flip=none rot=0.0 shift=(0,0) scale=1.00 gamma=1.00"


def test_other_slices_stay_well_below_a_near_copy(near_copy, volume):
    original, _, moved = near_copy
    copy_score = registered_ssim(original, moved)
    others = np.stack([volume[:, :, k] for k in (15, 45, 55)])
    result = register_pairs(np.stack([original] * 3), others)
    assert np.all(result.ssim_registered < copy_score - 0.1)


def test_search_space_can_be_narrowed(near_copy):
    original, _, moved = near_copy
    settings = RegistrationSettings(flips=False, max_rotation_deg=0, scale_range=(1, 1), chunk=1)
    result = register_pairs(original[None], moved[None], settings=settings)
    assert result.flip[0] == "none" and result.rotation_deg[0] == 0 and result.scale[0] == 1
    assert result.ssim_registered[0] < 0.6


def test_bad_input_raises():
    with pytest.raises(DeepSSIMError, match="one shape"):
        register_pairs(np.zeros((2, 16, 16)), np.zeros((2, 16, 17)))
    with pytest.raises(DeepSSIMError):
        register_pairs(np.zeros((2, 16, 16)), np.zeros((3, 16, 16)))
    with pytest.raises(DeepSSIMError):
        registered_ssim(np.zeros((16, 16)), np.zeros((1, 16, 16)))
    with pytest.raises(DeepSSIMError, match="constant"):
        register_pairs(np.zeros((1, 16, 16)), np.ones((1, 16, 16)))
    for bad in (
        {"max_rotation_deg": -1},
        {"max_shift_fraction": 0.7},
        {"scale_range": (1.1, 0.9)},
        {"chunk": 0},
        {"chunk": 2.5},
        {"device": "nonsense"},
    ):
        with pytest.raises(DeepSSIMError):
            RegistrationSettings(**bad)
    # chunks by device unless set: small on the CPU (cache), large on a GPU (fewer launches)
    assert RegistrationSettings().pairs_per_chunk == 256
    assert RegistrationSettings(device="cuda").pairs_per_chunk == 4096
    assert RegistrationSettings(device="cuda", chunk=8).pairs_per_chunk == 8


def test_registered_is_a_pairs_metric_for_calibrate_and_evaluate(near_copy):
    from deepssim.metrics import load_metric
    from deepssim.scanning.retrieve import retrieve

    original, _, moved = near_copy
    metric = load_metric("registered")
    assert metric.thresholds == (0.6, 0.85)
    score = metric.pair_scores(original[None], moved[None])[0]
    assert score == pytest.approx(registered_ssim(original, moved), abs=1e-12)
    with pytest.raises(DeepSSIMError, match="matched pairs only"):
        retrieve(metric, original[None], moved[None], 1)


def test_contrast_quantiles_equal_numpy_quantiles_of_the_scaled_pixels():
    from deepssim.ssim.registered import _LEVELS, _quantiles

    images = np.random.default_rng(3).gamma(2.0, 30.0, size=(5, 33, 28))
    unit = (images - images.min(axis=(1, 2), keepdims=True)) / np.ptp(images, axis=(1, 2), keepdims=True)
    expected = np.quantile(unit[:, ::2, ::2].reshape(5, -1), _LEVELS, axis=1).T
    np.testing.assert_allclose(_quantiles(images), expected, rtol=0, atol=1e-12)


def test_training_images_given_up_and_computed_again_score_the_same(volume, monkeypatch):
    """With room for only one chunk's training images, each is prepared again when a later chunk needs
    it (least recently used out first): the results equal those of keeping every training image."""
    from deepssim.ssim import _alignment
    from deepssim.ssim.registered import register_indexed

    rng = np.random.default_rng(4)
    train = np.stack([volume[::2, ::2, k] for k in range(10, 50, 5)])  # 8 slices, 64 x 64
    generated = train[[0, 3, 5, 1, 7, 2]] + rng.normal(0, 8, (6, 64, 64))
    ti, gi = rng.integers(0, 8, 24), np.repeat(np.arange(6), 4)  # 4 pairs per generated image
    settings = RegistrationSettings(chunk=4)
    kept = register_indexed(train, generated, ti, gi, settings=settings)
    made = []
    original_compute = _alignment.TrainingImages._compute

    def counting(self, images, slots, raw=None):
        made.extend(images.tolist())
        return original_compute(self, images, slots, raw)

    monkeypatch.setattr(_alignment, "TRAINING_CACHE_BYTES", 0)
    monkeypatch.setattr(_alignment.TrainingImages, "_compute", counting)
    again = register_indexed(train, generated, ti, gi, settings=settings)
    assert len(made) > len(set(made))  # some training images were prepared more than once
    for field in ("ssim_registered", "ssim_plain", "rotation_deg", "scale", "shift_px", "gamma"):
        np.testing.assert_array_equal(getattr(again, field), getattr(kept, field))
    assert list(again.flip) == list(kept.flip)


@pytest.mark.parametrize("kernel", ["c", "none", "torch"])
def test_exact_transforms_copy_pixels_as_numpy_slicing_does(kernel, monkeypatch):
    """The flip + whole-pixel shift candidates (C kernel, NumPy, or torch for the tensor path)
    against np.flip and np.roll."""
    import torch

    from deepssim.ssim import _alignment

    if kernel == "none":
        monkeypatch.setattr(_alignment, "_ssim_kernel", None)
    rng = np.random.default_rng(6)
    images = rng.normal(size=(3, 9, 7))
    rows, flips, shifts = np.array([0, 2, 1, 2, 0]), np.array([0, 1, 2, 3, 3]), rng.integers(-4, 5, (5, 2))
    source = torch.from_numpy(images) if kernel == "torch" else images
    moved = np.asarray(_alignment._exact_transform(source, flips, shifts, rows))
    for out, row, flip, (dr, dc) in zip(moved, rows, flips, shifts, strict=True):
        expected = images[row][:: -1 if flip & 1 else 1, :: -1 if flip & 2 else 1]
        expected = np.roll(expected, (dr, dc), axis=(0, 1))
        covered = np.zeros(expected.shape, dtype=bool)
        covered[max(dr, 0) : 9 + min(dr, 0), max(dc, 0) : 7 + min(dc, 0)] = True
        np.testing.assert_array_equal(out[covered], expected[covered])
        assert (out[~covered] == images[row].min()).all()


def test_training_images_read_from_files_and_kept_across_calls(volume, tmp_path):
    """TrainingImages over an ImageSet (a scan's training set): the same results as arrays, each image
    read once across calls, and a pickled copy (a Ray task's) carries the images, not what was kept."""
    import pickle

    from PIL import Image

    from deepssim import ImageSet
    from deepssim.ssim.registered import TrainingImages, register_indexed

    slices = [np.round(volume[::2, ::2, k]).astype(np.uint8) for k in (20, 28, 36, 44)]
    for i, image in enumerate(slices):
        Image.fromarray(image).save(tmp_path / f"t{i}.png")
    train_set = ImageSet.from_paths(tmp_path)
    train = train_set.read()
    generated = train[[2, 0, 3]] + np.random.default_rng(7).normal(0, 6, (3, *train.shape[1:]))
    ti, gi = np.array([2, 1, 0, 3, 3, 1]), np.array([0, 0, 1, 1, 2, 2])
    expected = register_indexed(train, generated, ti, gi)

    training = TrainingImages(train_set)
    reads = []
    original_raw = training.raw
    training.raw = lambda images: reads.extend(images.tolist()) or original_raw(images)
    first = register_indexed(training, generated[:2], ti[:4], gi[:4])
    second = register_indexed(training, generated, ti, gi)
    np.testing.assert_array_equal(second.ssim_registered, expected.ssim_registered)
    np.testing.assert_array_equal(first.ssim_registered, expected.ssim_registered[:4])
    assert sorted(reads) == [0, 1, 2, 3]  # each file read once, for the quantiles and the slots
    copy = pickle.loads(pickle.dumps(training))
    assert copy.capacity == 0 and not copy.quantile_of
    np.testing.assert_array_equal(
        register_indexed(copy, generated, ti, gi).ssim_registered, expected.ssim_registered
    )


def test_training_images_name_a_constant_or_non_finite_training_image():
    from deepssim.ssim.registered import TrainingImages, register_indexed

    rng = np.random.default_rng(8)
    train, generated = rng.normal(size=(3, 16, 16)), rng.normal(size=(1, 16, 16))
    train[2] = 5.0
    with pytest.raises(DeepSSIMError, match="training image 2 is constant"):
        register_indexed(TrainingImages(train), generated, [0, 2], [0, 0])
    train[1, 3, 3] = np.nan
    with pytest.raises(DeepSSIMError, match="training image 1 contains NaN"):
        register_indexed(TrainingImages(train), generated, [1], [0])


def test_registration_runs_torch_on_one_thread_and_restores_it(monkeypatch):
    """Inside registration torch runs on one thread (its idle OpenMP workers would spin on the
    kernels' cores) while the kernels keep torch's thread count; both come back afterwards, also
    after an error. Without the kernels torch does the work and keeps its threads."""
    import torch

    from deepssim.ssim import engine

    seen = []
    kernel = engine._in_threads

    def spy(n, run, minimum=16):
        seen.append((torch.get_num_threads(), engine._thread_count(None)))
        return kernel(n, run, minimum)

    monkeypatch.setattr("deepssim.ssim.registered._in_threads", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        image = np.add.outer(np.arange(24.0), np.arange(20.0)) % 7
        register_pairs(np.stack([image] * 8), np.stack([image[::-1]] * 8))
        assert seen and set(seen) == {(1, 2)}
        assert torch.get_num_threads() == 2 and engine._KERNEL_THREADS is None
        with pytest.raises(RuntimeError), engine.kernel_threads():
            with engine.kernel_threads():  # nested: the outer count stays
                assert engine._thread_count(None) == 2 and torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2 and engine._KERNEL_THREADS is None
        seen.clear()
        monkeypatch.setattr("deepssim.ssim.registered._ssim_kernel", None)  # torch's path keeps its threads
        register_pairs(np.stack([image] * 8), np.stack([image[::-1]] * 8))
        assert seen and set(seen) == {(2, 2)}
    finally:
        torch.set_num_threads(before)


def test_tensor_path_ssim_matches_scikit_image():
    """The tensor path's exact SSIM of raw candidates (float64, on the training images' device)
    against scikit-image on z-scored images, candidates from an array and from a tensor."""
    import torch
    from skimage.metrics import structural_similarity

    from deepssim.ssim import _alignment
    from deepssim.ssim.engine import TrainingStatistics

    rng = np.random.default_rng(9)
    train = rng.normal(size=(3, 20, 17)).cumsum(1)
    raw = 5 + 2 * rng.normal(size=(4, 20, 17)).cumsum(2)
    statistics = TrainingStatistics.empty(3, 20, 17)
    statistics.put(np.arange(3), train)
    tensors = tuple(torch.from_numpy(getattr(statistics, name)) for name in _alignment._STATISTICS)
    slots, rows = np.array([2, 0, 1, 2]), np.array([1, 3, 0, 1])

    def zscore(x):
        return (x - x.mean()) / x.std()

    expected = [
        structural_similarity(zscore(train[s]), zscore(raw[r]), data_range=np.ptp(zscore(train[s])))
        for s, r in zip(slots, rows, strict=True)
    ]
    for candidates in (raw, torch.from_numpy(raw)):
        got = _alignment._ssim_raw_torch(tensors, slots, candidates, rows).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-12)
    raw[3] = 1.0
    with pytest.raises(DeepSSIMError, match="generated image 3 is constant"):
        _alignment._ssim_raw_torch(tensors, slots, raw, rows)
