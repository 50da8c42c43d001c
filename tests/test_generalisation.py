"""The leave-one-source-out protocol: planted pairs, held-out calibration, recall."""

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import f1_score

from deepssim.evaluation.generalisation import (
    Source,
    duplicate_recall,
    macro_f1_held_out,
    plant_pairs,
    regression,
)
from deepssim.scanning.decide import calibrate, classify
from tests.helpers import SOURCES
from tests.test_ssim import reference_matrix


@pytest.fixture(scope="module")
def sources():
    volume = np.asarray(nib.load(SOURCES / "KmeansTest_T1UCharRaw.nii.gz").get_fdata())
    stack = np.moveaxis(volume[32:96, 32:96, 20:44], 2, 0)
    rng = np.random.default_rng(0)
    others = np.stack(
        [np.roll(stack[k], 5 * k, axis=1) + rng.normal(0, 3, stack[k].shape) for k in (2, 9, 15)]
    )
    return [
        Source("volume", stack, ["v"] * len(stack), np.arange(len(stack)), ["v"] * len(stack)),
        Source("slices", others, ["a", "b", "c"], np.full(3, -1), ["a", "b", "c"]),
    ]


def test_planted_pairs_have_kinds_labels_and_exact_ssim(sources):
    pairs = plant_pairs(sources[0], sources[1:], per_class=6, seed=0)
    assert np.bincount(pairs.labels).tolist() == [6, 6, 6]
    assert set(pairs.kinds) <= {
        "degraded_copy",
        "neighbour_slice",
        "deformed",
        "blend",
        "other_subject_random",
        "other_subject_nearest",
    }
    expected = [reference_matrix(pairs.first[[i]], pairs.second[[i]])[0, 0] for i in range(len(pairs.labels))]
    np.testing.assert_allclose(pairs.ssim, expected, atol=1e-8)
    again = plant_pairs(sources[0], sources[1:], per_class=6, seed=0)
    np.testing.assert_array_equal(again.second, pairs.second)


def test_held_out_thresholds_come_only_from_the_other_sources(rng):
    labels = {s: np.repeat([0, 2, 1], 20) for s in ("a", "b", "c")}
    scores = {
        s: np.concatenate([rng.uniform(0, 0.5, 20), rng.uniform(0.4, 0.8, 20), rng.uniform(0.7, 1, 20)])
        for s in labels
    }
    scores["c"] = scores["c"] * 0.5  # a shifted source: its own calibration would differ
    f1, (low, high) = macro_f1_held_out(scores, labels, "c")
    thresholds, _ = calibrate(
        np.concatenate([scores["a"], scores["b"]]), np.concatenate([labels["a"], labels["b"]])
    )
    assert (low, high) == (thresholds.low, thresholds.high)
    assert f1 == pytest.approx(f1_score(labels["c"], classify(scores["c"], thresholds), average="macro"))
    fit = regression(np.array([0.1, 0.55, 0.95]), np.array([0.0, 0.5, 1.0]))
    assert fit["mae"] == pytest.approx(0.2 / 3) and fit["signed_error_by_decile"][0] == pytest.approx(0.1)


def test_recall_counts_the_own_image_first_or_in_the_top_five(sources):
    source = sources[0]

    def perfect(queries, gallery):  # the true source first: the best SSIM of the unaligned image
        return np.argsort(-reference_matrix(gallery, queries).T, axis=1)[:, :5]

    def never(queries, gallery):
        return np.full((len(queries), 5), -1)

    assert duplicate_recall(source, never, queries=6, seed=0) == {"recall_at_1": 0.0, "recall_at_5": 0.0}
    found = duplicate_recall(source, perfect, queries=6, seed=0)
    assert 0.0 <= found["recall_at_1"] <= found["recall_at_5"] <= 1.0


def test_recall_at_deeper_k_counts_the_own_image_anywhere_in_the_top_k(sources):
    source = sources[0]
    n = len(source.images)

    def everything(queries, gallery):  # every gallery image, best SSIM first
        return np.argsort(-reference_matrix(gallery, queries).T, axis=1)

    found = duplicate_recall(source, everything, queries=6, seed=0, depths=(1, 5, n))
    assert set(found) == {"recall_at_1", "recall_at_5", f"recall_at_{n}"}
    assert found[f"recall_at_{n}"] == 1.0  # the whole gallery holds the own image
    assert found["recall_at_1"] <= found["recall_at_5"] <= 1.0
