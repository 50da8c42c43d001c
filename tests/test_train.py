"""Pair sampling, SSIM targets, training, resuming and the train/embed/export commands."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepssim import DeepSSIM, DeepSSIMError, load_images
from deepssim.cli import main
from deepssim.io.normalise import zscore
from deepssim.training.pairs import SSIM_BINS, degrade, pairs_from_csv, sample_pairs, second_images
from deepssim.training.train import TrainSettings, train
from tests.helpers import EXAMPLE, SOURCES
from tests.test_ssim import reference_matrix

TINY = dict(epochs=2, n_pairs=48, batch_size=16, val_fraction=0.25)


@pytest.fixture(scope="module")
def volume_pool():
    """Slices of one real MRI volume plus two 2D images, as a z-scored pool with groups."""
    import nibabel as nib

    volume = np.asarray(nib.load(SOURCES / "KmeansTest_T1UCharRaw.nii.gz").get_fdata())
    slices = [volume[32:96, 32:96, z] for z in range(20, 44)]
    _, example = load_images(EXAMPLE / "train")
    pool = zscore(np.stack(slices + [example[0, 32:96, 32:96], example[5, 32:96, 32:96]]))
    groups = ["volume"] * 24 + ["a", "b"]
    slice_index = np.array(list(range(24)) + [-1, -1])
    return pool, groups, slice_index


def test_sampled_pairs_cover_the_ssim_range_and_split_by_source(volume_pool):
    pool, groups, slice_index = volume_pool
    table = sample_pairs(pool, groups, slice_index, n_pairs=200, val_fraction=0.34, seed=1)
    expected = [
        reference_matrix(pool[[i]], second_images(pool, table.select([row])))[0, 0]
        for row, i in enumerate(table.first[:5])
    ]
    np.testing.assert_allclose(table.ssim[:5], expected, atol=1e-8)
    train_images = set(table.of_split("train").first) | set(table.of_split("train").second)
    val_images = set(table.of_split("val").first) | set(table.of_split("val").second)
    assert train_images and val_images and not train_images & val_images
    counts, _ = np.histogram(np.clip(table.ssim, 0, 1), SSIM_BINS)
    assert (counts[-2:] > 0).all()  # near-copies (> 0.8) are present
    filled = counts[counts > 0]
    assert (counts > 0).sum() >= 8 and filled.max() <= 4 * filled.min()  # even across the SSIM bins
    again = sample_pairs(pool, groups, slice_index, n_pairs=200, val_fraction=0.34, seed=1)
    np.testing.assert_array_equal(again.ssim, table.ssim)


def test_degradation_is_seeded_and_mild(volume_pool):
    pool, _, _ = volume_pool
    np.testing.assert_array_equal(degrade(pool[3], 7), degrade(pool[3], 7))
    score = reference_matrix(pool[[3]], degrade(pool[3], 7)[None])[0, 0]
    assert 0.3 < score <= 1.0


def test_pairs_from_csv_compute_missing_ssim_and_check_keys(tmp_path, volume_pool):
    pool, _, _ = volume_pool
    train_keys = [f"r{i}" for i in range(4)]
    generated_keys = [f"s{i}" for i in range(4)]
    images = pool[:8]
    path = tmp_path / "pairs.csv"
    path.write_text("train_key,generated_key,split\nr0,s1,train\nr2,s3,val\n")
    table = pairs_from_csv(path, train_keys, generated_keys, images)
    np.testing.assert_allclose(
        table.ssim,
        [reference_matrix(images[[0]], images[[5]])[0, 0], reference_matrix(images[[2]], images[[7]])[0, 0]],
        atol=1e-8,
    )
    assert list(table.split) == ["train", "val"]
    path.write_text("train_key,generated_key\nr0,s9\n")
    with pytest.raises(DeepSSIMError, match="pairs.csv:2: generated_key 's9'"):
        pairs_from_csv(path, train_keys, generated_keys, images)
    path.write_text("train,generated\nr0,s1\n")
    with pytest.raises(DeepSSIMError, match="missing column"):
        pairs_from_csv(path, train_keys, generated_keys, images)


def test_training_writes_checkpoints_log_and_cached_pairs(tmp_path):
    result = train(EXAMPLE / "train", tmp_path / "run", TrainSettings(**TINY))
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    with open(tmp_path / "run" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"val_aligned_mae", "val_misaligned_pearson"} <= set(rows[0])
    model = DeepSSIM.load(result.best_checkpoint)
    assert model.config["training"]["best_epoch"] in (1, 2)
    assert model.config["training"]["settings"]["n_pairs"] == 48
    cached = (tmp_path / "run" / "pairs.npz").stat().st_mtime_ns
    train(EXAMPLE / "train", tmp_path / "run", TrainSettings(**TINY), resume=False)
    assert (tmp_path / "run" / "pairs.npz").stat().st_mtime_ns == cached  # targets reused


def test_resumed_training_equals_uninterrupted(tmp_path, monkeypatch):
    settings = TrainSettings(**TINY, precision="float32")
    train(EXAMPLE / "train", tmp_path / "straight", settings)

    import deepssim.training.train as training

    original = training._train_epoch

    def interrupted(*args):
        if args[-2] == 1:  # (..., epoch, progress)
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(training, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(EXAMPLE / "train", tmp_path / "resumed", settings)
    monkeypatch.setattr(training, "_train_epoch", original)
    train(EXAMPLE / "train", tmp_path / "resumed", settings)
    straight = load_file(tmp_path / "straight" / "last.safetensors")
    resumed = load_file(tmp_path / "resumed" / "last.safetensors")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    with pytest.raises(DeepSSIMError, match="other settings"):
        train(EXAMPLE / "train", tmp_path / "resumed", TrainSettings(**{**TINY, "epochs": 3}))


def test_bad_training_settings_are_refused(tmp_path):
    with pytest.raises(DeepSSIMError, match="float16 needs a CUDA"):
        train(EXAMPLE / "train", tmp_path, TrainSettings(precision="float16"))
    with pytest.raises(DeepSSIMError, match="unknown architecture"):
        train(EXAMPLE / "train", tmp_path, TrainSettings(**{**TINY, "architecture": "resnet9000"}))


def test_train_embed_export_commands(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--epochs", "1", "--n-pairs", "32", "--batch-size", "16", "--no-progress"]
    assert main(["train", "--images", str(EXAMPLE / "train"), "--out", str(run), *args]) == 0
    assert "best epoch 1 of 1" in capsys.readouterr().out
    out = tmp_path / "embeddings.npz"
    model = str(run / "best.safetensors")
    assert (
        main(
            [
                "embed",
                "--images",
                str(EXAMPLE / "generated"),
                "--model",
                model,
                "--out",
                str(out),
                "--precision",
                "float32",
                "--no-progress",
            ]
        )
        == 0
    )
    with np.load(out) as saved:
        keys, images = load_images(EXAMPLE / "generated")
        assert saved["keys"].tolist() == keys
        np.testing.assert_allclose(saved["embeddings"], DeepSSIM.load(model).embed(images), atol=1e-6)
    scripted = tmp_path / "model.pt"
    assert main(["export", "--model", model, "--out", str(scripted)]) == 0
    assert (
        main(
            [
                "embed",
                "--images",
                str(EXAMPLE / "generated"),
                "--model",
                str(scripted),
                "--out",
                str(tmp_path / "again.npz"),
                "--precision",
                "float32",
                "--no-progress",
            ]
        )
        == 0
    )
    with np.load(tmp_path / "again.npz") as again, np.load(out) as first:
        np.testing.assert_allclose(again["embeddings"], first["embeddings"], atol=1e-5)
    assert (
        main(
            [
                "embed",
                "--images",
                str(EXAMPLE / "generated"),
                "--model",
                str(EXAMPLE / "planted.csv"),
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )
    assert "neither a DeepSSIM checkpoint" in capsys.readouterr().err
