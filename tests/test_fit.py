"""deepssim fit: fine-tune the start model on the user's training images, keep it only if better."""

import json

import numpy as np
from safetensors.numpy import load_file

from deepssim.training.fit import FitSettings, cached_fit, describe, fit
from tests.helpers import EXAMPLE

TINY = {"epochs": 1, "n_pairs": 48, "batch_size": 16, "precision": "float32"}


def test_fit_validates_on_held_out_files_and_is_deterministic(tmp_path):
    first = fit(EXAMPLE / "train", tmp_path / "a", settings=FitSettings(**TINY))
    report = json.loads((tmp_path / "a" / "fit.json").read_text())
    assert report == first.report and report["epochs"] == 1
    start, fitted = report["validation"]["start"], report["validation"]["fitted"]
    assert set(start) == set(fitted) and "val_misaligned_mae" in start
    # the kept model is the better of the start model (epoch 0) and the fitted epoch
    score = lambda row: row["val_aligned_mse"] + row["val_misaligned_mse"]  # noqa: E731
    assert score(fitted) <= score(start) + 1e-12
    assert ("did not help" in describe(first)) == (report["best_epoch"] == 0)
    again = fit(EXAMPLE / "train", tmp_path / "b", settings=FitSettings(**TINY))
    a, b = load_file(first.model_path), load_file(again.model_path)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_second_fit_of_the_same_images_comes_from_the_cache(tmp_path):
    settings = FitSettings(**TINY)
    made = cached_fit(EXAMPLE / "train", settings=settings, cache_dir=tmp_path)
    reused = cached_fit(EXAMPLE / "train", settings=settings, cache_dir=tmp_path)
    assert not made.cached and reused.cached and reused.model_path == made.model_path
    other = cached_fit(EXAMPLE / "train", settings=FitSettings(**{**TINY, "seed": 1}), cache_dir=tmp_path)
    assert other.model_path != made.model_path
