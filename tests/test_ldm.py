"""The latent diffusion case study: duplication, training, resuming, conditioning, generation."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepssim import DeepSSIMError, load_images
from deepssim.cli import main
from deepssim.experiments.ldm import RunInfo, generate, repetition_counts, train_diffusion, train_vae
from tests.helpers import EXAMPLE

TINY = dict(image_size=(16, 16), vae_epochs=1, diffusion_epochs=1, vae_batch_size=8, diffusion_batch_size=8)


def test_duplication_levels_follow_the_paper():
    assert repetition_counts(50, "none", 0) == [1] * 50
    low, high = np.array(repetition_counts(500, "low", 0)), np.array(repetition_counts(500, "high", 0))
    assert low.min() == 2 and low.max() == 5
    assert high.min() == 2 and high.max() == 15
    assert repetition_counts(20, "high", 3) == repetition_counts(20, "high", 3)
    with pytest.raises(DeepSSIMError, match="duplication must be"):
        repetition_counts(3, "extreme", 0)


def test_train_resume_generate_and_scan(tmp_path):
    run = train_vae(EXAMPLE / "train", tmp_path / "run", "small", "low", **TINY)
    info = RunInfo.load(run)
    assert info.scale_factor > 0 and len(info.keys) == 16 and min(info.repeats) >= 2
    train_diffusion(EXAMPLE / "train", run, epochs=1)
    shutil.copytree(run, tmp_path / "straight")
    train_diffusion(EXAMPLE / "train", run, epochs=2)  # resumes from epoch 1
    train_diffusion(EXAMPLE / "train", tmp_path / "straight", epochs=2)
    resumed, straight = (
        load_file(run / "unet.safetensors"),
        load_file(tmp_path / "straight" / "unet.safetensors"),
    )
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    with open(run / "log_diffusion.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    out = tmp_path / "generated"
    settings = generate(run, out, per_image=1, steps=3)
    assert settings["images"] == 16
    keys, images = load_images(out)
    assert images.shape == (16, 16, 16) and np.isfinite(images).all()
    with open(out / "manifest.csv") as handle:
        manifest = list(csv.DictReader(handle))
    assert [row["generated_key"] for row in manifest] == keys
    assert {row["duplication"] for row in manifest} == {"low"}
    assert (
        main(
            [
                "scan",
                "--train",
                str(out),
                "--generated",
                str(out),
                "--metric",
                "ssim",
                "--out",
                str(tmp_path / "scan"),
                "--no-progress",
            ]
        )
        == 0
    )
    with pytest.raises(DeepSSIMError, match="other settings"):
        train_vae(EXAMPLE / "train", run, "small", "high", **TINY)


def test_conditioning_and_clear_errors(tmp_path):
    keys, _ = load_images(EXAMPLE / "train")
    conditions = tmp_path / "conditions.csv"
    with open(conditions, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "age", "sex"])
        for i, key in enumerate(keys):
            writer.writerow([key, 20 + i, i % 2])
    run = train_vae(EXAMPLE / "train", tmp_path / "run", "small", "none", conditions, **TINY)
    with pytest.raises(DeepSSIMError, match="train-diffusion"):
        generate(run, tmp_path / "never", per_image=1, steps=2)
    train_diffusion(EXAMPLE / "train", run)
    generate(run, tmp_path / "generated", per_image=2, steps=2)
    with open(tmp_path / "generated" / "manifest.csv") as handle:
        assert [row["conditioned_on"] for row in csv.DictReader(handle)][:3] == [keys[0], keys[0], keys[1]]
    (run / "unet.safetensors").write_bytes(b"not weights")
    with pytest.raises(DeepSSIMError, match="corrupt"):
        generate(run, tmp_path / "again", per_image=1, steps=2)
    bad = tmp_path / "bad.csv"
    bad.write_text("key,age\nnobody,3\n")
    with pytest.raises(DeepSSIMError, match="no conditions for 16"):
        train_vae(EXAMPLE / "train", tmp_path / "run2", "small", "none", bad, **TINY)
    with pytest.raises(DeepSSIMError, match="not a run"):
        RunInfo.load(tmp_path / "missing")
