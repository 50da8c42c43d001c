"""The registration cascade decides like full registration, with exact evidence for every Similar
and Duplicate: copies (flipped, rotated, noisy), look-alikes (neighbouring slices) and different
subjects, at 64x64 so the test runs in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from deepssim.errors import DeepSSIMError
from deepssim.io.normalise import fit_to_size
from deepssim.scanning.registration import register_top_k
from deepssim.ssim import ssim_matrix
from deepssim.ssim.engine import ssim_pairs
from deepssim.ssim.registered import (
    apply_transform,
    register_cascade,
    register_indexed,
    register_pairs,
)

SOURCES = Path(__file__).resolve().parents[1] / "data" / "sources"

LOW, HIGH = 0.6, 0.85
SHAPE = (64, 64)


def classes(best: np.ndarray, low=LOW, high=HIGH) -> np.ndarray:
    return np.where(best > high, 2, np.where(best <= low, 0, 1))


@pytest.fixture(scope="module")
def problem():
    """Training slices of one volume; generated: misaligned noisy copies, neighbouring slices and
    slices of another volume; each generated image's top 5 training images by plain SSIM."""
    import nibabel as nib

    volume = np.asarray(nib.load(SOURCES / "KmeansTest_T1UCharRaw.nii.gz").dataobj, dtype=np.float64)
    other = np.asarray(nib.load(SOURCES / "S0_10slices.nii.gz").dataobj, dtype=np.float64)[..., 0]
    rng = np.random.default_rng(7)
    train_rows = np.arange(10, 54, 2)
    train = np.stack([fit_to_size(ndimage.zoom(volume[:, :, k], 0.5, order=1), SHAPE) for k in train_rows])
    generated = []
    for i in range(12):  # copies: flipped, rotated, shifted, noisy
        image = train[rng.integers(len(train))] + rng.normal(0, 3, SHAPE)
        if i % 2:
            image = image[:, ::-1]
        image = ndimage.rotate(image, rng.uniform(-10, 10), reshape=False, order=3, mode="nearest")
        generated.append(np.roll(image, tuple(rng.integers(-3, 4, 2)), axis=(0, 1)))
    for k in train_rows[:8] + 1:  # look-alikes: the slices between training slices
        generated.append(fit_to_size(ndimage.zoom(volume[:, :, k], 0.5, order=1), SHAPE))
    for k in range(other.shape[2]):  # different subjects
        generated.append(fit_to_size(ndimage.zoom(other[:, :, k], 0.5, order=1), SHAPE))
    generated = np.stack(generated)
    neighbours = np.argsort(-ssim_matrix(train, generated).T, axis=1, kind="stable")[:, :5]
    return train, generated, neighbours


def test_cascade_classes_match_full_registration_with_exact_evidence(problem):
    train, generated, neighbours = problem
    ti, gi = neighbours.ravel(), np.repeat(np.arange(len(generated)), neighbours.shape[1])
    full = register_indexed(train, generated, ti, gi)
    cascade = register_cascade(train, generated, ti, gi, (LOW, HIGH))
    best_full = full.ssim_registered.reshape(neighbours.shape).max(axis=1)
    best_cascade = cascade.ssim_registered.reshape(neighbours.shape).max(axis=1)
    decided = classes(best_cascade)
    np.testing.assert_array_equal(decided, classes(best_full))
    assert set(decided.tolist()) == {0, 1, 2}  # the problem has every class
    # every Similar and Duplicate carries its exact registered SSIM and transform, as full gives it for
    # that pair; a Similar's pair is its best of the k (a Duplicate's is a copy, maybe not the best)
    rank = cascade.ssim_registered.reshape(neighbours.shape).argmax(axis=1)
    for i in np.flatnonzero(decided > 0):
        p = i * neighbours.shape[1] + rank[i]
        assert cascade.searched[p]
        assert cascade.ssim_registered[p] == pytest.approx(full.ssim_registered[p], abs=1e-9)
        if decided[i] == 1:
            assert best_cascade[i] == pytest.approx(best_full[i], abs=1e-9)
        moved = apply_transform(generated[i], **cascade.transform(p))
        assert ssim_pairs(train[ti[p]][None], moved[None])[0] == pytest.approx(
            cascade.ssim_registered[p], abs=2e-6
        )
    # each image's first pair is registered; where it is a copy (above high) the others are not,
    # unless their plain SSIM beats it; an image without a copy has every pair registered
    searched = cascade.searched.reshape(neighbours.shape)
    first = cascade.ssim_registered.reshape(neighbours.shape)[:, 0]
    assert searched[:, 0].all()
    assert (first > HIGH).any()
    for i in np.flatnonzero(first > HIGH):
        others = slice(i * neighbours.shape[1] + 1, (i + 1) * neighbours.shape[1])
        assert not cascade.searched[others][cascade.ssim_plain[others] <= first[i]].any()
    assert searched[decided < 2].all()
    assert not searched.all()  # it saved work
    # a registered pair scores as in full registration; one not registered keeps an exact lower bound:
    # the SSIM of the unmoved image it reports
    np.testing.assert_allclose(
        cascade.ssim_registered[cascade.searched], full.ssim_registered[cascade.searched], atol=1e-9
    )
    np.testing.assert_allclose(cascade.ssim_plain, full.ssim_plain, atol=1e-9)
    assert (cascade.ssim_registered[~cascade.searched] == cascade.ssim_plain[~cascade.searched]).all()
    assert (cascade.ssim_registered <= full.ssim_registered + 1e-9).all()


def test_cascade_rounds_find_copies_beyond_the_first_rank(problem):
    """Copies retrieved second or later: ranked behind a look-alike, each is found and stops its image's
    registration; the pairs after it are left unsearched."""
    train, generated, neighbours = problem
    copies = np.arange(12)
    reversed_order = neighbours[copies][:, ::-1]  # the copy's own slice last of five
    ti, gi = reversed_order.ravel(), np.repeat(np.arange(len(copies)), neighbours.shape[1])
    full = register_indexed(train, generated[copies], ti, gi)
    cascade = register_cascade(train, generated[copies], ti, gi, (LOW, HIGH))
    scores = full.ssim_registered.reshape(reversed_order.shape)
    np.testing.assert_array_equal(
        classes(cascade.ssim_registered.reshape(scores.shape).max(axis=1)), classes(scores.max(axis=1))
    )
    searched = cascade.searched.reshape(scores.shape)
    for i in range(len(copies)):
        above = np.flatnonzero(scores[i] > HIGH)
        if len(above):  # registered up to its first copy's round at least, never all past it
            assert searched[i, : above[0] + 1].all()
    assert not searched.all()


def test_cascade_registers_noisy_copies_a_few_pixels_off():
    """Textured copies shifted by 1-2 px, re-contrasted and noisy: plain SSIM 0.15-0.45, registered
    up to 0.91 (a cascade that judged pairs by an estimate from plain SSIM called two Duplicates
    Different; this one registers every pair of an image until it finds a copy)."""
    from deepssim.io.load import load_images

    _, slices = load_images(Path(__file__).resolve().parents[1] / "data" / "example" / "train")
    train = np.stack([fit_to_size(image, SHAPE) for image in slices])
    train = (train - train.min(axis=(1, 2), keepdims=True)) / np.ptp(train, axis=(1, 2), keepdims=True)
    rng = np.random.default_rng(0)
    generated = np.stack(
        [
            np.roll(image, (2, 1 - 2 * (i % 2)), axis=(0, 1)) ** 0.8 + rng.normal(0, 0.02, SHAPE)
            for i, image in enumerate(train)
        ]
    )
    neighbours = np.argsort(-ssim_matrix(train, generated).T, axis=1, kind="stable")[:, :3]
    ti, gi = neighbours.ravel(), np.repeat(np.arange(len(generated)), neighbours.shape[1])
    full = register_indexed(train, generated, ti, gi).ssim_registered.reshape(neighbours.shape).max(axis=1)
    cascade = register_cascade(train, generated, ti, gi, (LOW, HIGH))
    best = cascade.ssim_registered.reshape(neighbours.shape).max(axis=1)
    assert (classes(full) == 2).sum() >= 2 and ((classes(full) == 1).sum() >= 2)
    assert (ssim_pairs(train, generated) < 0.5).all()
    np.testing.assert_array_equal(classes(best), classes(full))


def test_indexed_registration_equals_pairwise(problem):
    train, generated, neighbours = problem
    ti, gi = neighbours[:6].ravel(), np.repeat(np.arange(6), neighbours.shape[1])
    indexed = register_indexed(train, generated, ti, gi)
    pairwise = register_pairs(train[ti], generated[gi])
    np.testing.assert_allclose(indexed.ssim_registered, pairwise.ssim_registered, atol=1e-9)
    assert indexed.searched.all()


def test_scan_stage_modes_and_thresholds(problem, tmp_path):
    from deepssim.io.load import ImageSet

    train, generated, neighbours = problem
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "generated.npy", generated)
    train_set, generated_set = (
        ImageSet.from_paths(tmp_path / "train.npy"),
        ImageSet.from_paths(tmp_path / "generated.npy"),
    )
    full = register_top_k(train_set, generated_set, neighbours, mode="full")
    cascade = register_top_k(train_set, generated_set, neighbours, mode="cascade", thresholds=(LOW, HIGH))
    assert full.searched.all()
    np.testing.assert_array_equal(
        classes(np.nanmax(cascade.ssim_registered, axis=1)), classes(np.nanmax(full.ssim_registered, axis=1))
    )
    # thresholds come from the caller: a higher Duplicate threshold is honoured as given
    strict = register_top_k(train_set, generated_set, neighbours, mode="cascade", thresholds=(0.7, 0.95))
    np.testing.assert_array_equal(
        classes(np.nanmax(strict.ssim_registered, axis=1), 0.7, 0.95),
        classes(np.nanmax(full.ssim_registered, axis=1), 0.7, 0.95),
    )
    with pytest.raises(DeepSSIMError):
        register_top_k(train_set, generated_set, neighbours, mode="cascade")
    with pytest.raises(DeepSSIMError):
        register_top_k(train_set, generated_set, neighbours, mode="fast")


def test_cascade_tables_never_show_a_bound_as_registered_ssim(tmp_path):
    import csv
    import json

    from deepssim import scan
    from deepssim.scanning.tables import NOT_SEARCHED
    from tests.helpers import EXAMPLE

    result = scan(EXAMPLE / "train", EXAMPLE / "generated", registration="cascade", cache=False)
    assert not result.evidence.searched.all()  # the cascade left some pairs unsearched
    # counts of copied training images are then lower bounds, and every output says so
    assert "at least" in result.summary.text() and "--registration full" in result.summary.text()
    files = result.save(tmp_path / "out")
    assert "lower bound" in json.loads(files["summary"].read_text())["copy_counts"]
    assert "id='copy-counts'" in files["report"].read_text()
    full = scan(EXAMPLE / "train", EXAMPLE / "generated", registration="full", cache=False)
    assert full.summary.copy_counts is None and "lower bounds" not in full.summary.text()
    copied = full.summary.training_images_with_a_duplicate["count"]
    assert result.summary.training_images_with_a_duplicate["count"] <= copied
    with open(files["pairs"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    unsearched = [r for r in rows if r["transform"] == NOT_SEARCHED]
    assert unsearched and all(r["ssim_registered"] == "" for r in unsearched)
    assert all(float(r["decision_score"]) >= float(r["ssim"]) - 1e-6 for r in unsearched)  # a lower bound
    with open(files["results"], newline="") as handle:
        for row in csv.DictReader(handle):  # every Similar and Duplicate carries its exact evidence
            if row["class"] != "Different":
                assert row["top1_ssim_registered"] and row["top1_transform"] != NOT_SEARCHED


def test_tensor_path_decides_like_the_kernels(problem, monkeypatch):
    """The GPU's code path (torch throughout: coarse search, Gauss-Newton, warps, candidates and
    their exact SSIM in float64), run here on the CPU without the C kernels, against the kernels:
    the same classes, transforms and scores (to float32 rounding of the search) on copies,
    look-alikes and different subjects, for full registration and the cascade."""
    from deepssim.ssim import _alignment, registered

    train, generated, neighbours = problem
    ti, gi = neighbours.ravel(), np.repeat(np.arange(len(generated)), neighbours.shape[1])
    kernels = (
        register_indexed(train, generated, ti, gi),
        register_cascade(train, generated, ti, gi, (LOW, HIGH)),
    )
    assert _alignment._ssim_kernel is not None and _alignment._warp_kernel is not None
    for module, name in (
        (_alignment, "_ssim_kernel"),
        (_alignment, "_warp_kernel"),
        (registered, "_ssim_kernel"),
    ):
        monkeypatch.setattr(module, name, None)
    scored = []
    original = _alignment._ssim_raw_torch
    monkeypatch.setattr(_alignment, "_ssim_raw_torch", lambda *a: scored.append(len(a[1])) or original(*a))
    tensors = (
        register_indexed(train, generated, ti, gi),
        register_cascade(train, generated, ti, gi, (LOW, HIGH)),
    )
    assert sum(scored) >= 2 * len(ti)  # every pair's plain SSIM and candidates went through torch
    for expected, got in zip(kernels, tensors, strict=True):
        best = [r.ssim_registered.reshape(neighbours.shape).max(axis=1) for r in (expected, got)]
        np.testing.assert_array_equal(classes(best[1]), classes(best[0]))
        np.testing.assert_allclose(got.ssim_registered, expected.ssim_registered, atol=1e-5, equal_nan=True)
        np.testing.assert_allclose(got.ssim_plain, expected.ssim_plain, atol=1e-12, equal_nan=True)
        assert list(got.flip) == list(expected.flip)
        np.testing.assert_allclose(got.shift_px, expected.shift_px, atol=1e-3)
        np.testing.assert_array_equal(got.searched, expected.searched)
