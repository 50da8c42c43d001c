"""Patients (groups of training images) and the label-free, conformal Duplicate threshold."""

import csv

import nibabel as nib
import numpy as np
import pytest

from deepssim import DeepSSIMError, ImageSet, scan
from deepssim.scanning.decide import conformal_threshold
from deepssim.scanning.groups import group_of_each_image
from tests.helpers import EXAMPLE, smooth_image
from tests.test_model import fast_model

SUBJECT = r"^(ants|dwi|itk|kmeans|mni)"


def test_conformal_threshold_keeps_its_false_positive_rate():
    """Split conformal: with n exchangeable null scores the chance that a new one exceeds the
    threshold is at most the rate. Checked by simulation, for a skewed distribution."""
    rng = np.random.default_rng(0)
    n, rate, trials = 99, 0.1, 4000
    exceed = 0
    for _ in range(trials):
        scores = rng.beta(2, 5, n + 1)
        exceed += scores[-1] > conformal_threshold(scores[:-1], rate)
    assert exceed / trials <= rate + 3 * np.sqrt(rate * (1 - rate) / trials)
    assert exceed / trials >= rate - 3 * np.sqrt(rate * (1 - rate) / trials)  # and not needlessly strict
    assert conformal_threshold(np.arange(9.0), 0.1) == 8.0  # rank ceil(10 * 0.9) = 9
    with pytest.raises(DeepSSIMError, match="too few"):
        conformal_threshold(np.arange(5.0), 0.05)


def test_groups_by_volume_folder_and_pattern(tmp_path, rng):
    for patient in ("p1", "p2"):
        (tmp_path / patient).mkdir()
        for view in ("a", "b"):
            np.save(tmp_path / patient / f"{view}.npy", smooth_image(rng, (16, 16)))
    volume = np.stack([smooth_image(rng, (16, 16)) for _ in range(3)], axis=2)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "sub-07_T1.nii.gz")
    images = ImageSet.from_paths(tmp_path)
    by_volume = dict(zip(images.keys, group_of_each_image(images, "volume"), strict=True))
    assert by_volume["sub-07_T1#1"] == "sub-07_T1" and by_volume["p1/a"] == "p1/a"
    by_folder = dict(zip(images.keys, group_of_each_image(images, "folder"), strict=True))
    assert by_folder["p1/a"] == by_folder["p1/b"] == "p1" and by_folder["sub-07_T1#0"] == "."
    by_pattern = dict(zip(images.keys, group_of_each_image(images, r"(p\d|sub-\d+)"), strict=True))
    assert by_pattern["p2/b"] == "p2" and by_pattern["sub-07_T1#2"] == "sub-07"
    with pytest.raises(DeepSSIMError, match="does not match the key"):
        group_of_each_image(images, r"patient-(\d+)")


def test_scan_counts_patients_and_sets_the_threshold_from_other_patients(tmp_path):
    model = fast_model(seed=3)
    result = scan(
        EXAMPLE / "train",
        EXAMPLE / "generated",
        model=model,
        decision="score",
        group_by=SUBJECT,
        duplicate_fpr=0.1,
        cache=False,
        precision="float32",
    )
    # brute force: each training image's best cosine against the other subjects' images
    keys = result.train_keys
    vectors = model.embed(ImageSet.from_paths(EXAMPLE / "train"), precision="float32")
    subjects = np.array([k.split("_")[0] for k in keys])
    similarity = vectors @ vectors.T
    similarity[subjects[:, None] == subjects[None, :]] = -np.inf
    null = np.sort(similarity.max(axis=1))
    assert result.thresholds.high == pytest.approx(null[int(np.ceil(17 * 0.9)) - 1], abs=1e-5)
    assert result.thresholds.source.startswith("fpr 0.1 from 5 training groups")
    files = result.save(tmp_path / "out")
    with open(files["groups"]) as handle:
        rows = {row["group"]: row for row in csv.DictReader(handle)}
    assert sum(int(r["training_images"]) for r in rows.values()) == 16
    memorised = result.best_per_training_image > result.thresholds.high
    for subject, row in rows.items():
        assert int(row["images_with_a_duplicate"]) == int(memorised[subjects == subject].sum())
    patients = result.summary.groups["with_a_duplicate"]["count"]
    assert patients == sum(int(r["images_with_a_duplicate"]) > 0 for r in rows.values())
    assert "id='patient-table'" in files["report"].read_text()
    with pytest.raises(DeepSSIMError, match="needs --group-by"):
        scan(EXAMPLE / "train", EXAMPLE / "generated", model=model, duplicate_fpr=0.1, cache=False)
