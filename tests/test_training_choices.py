"""The training choices the augmentation study turns on and off: augmentation families, pair kinds,
the pseudo-subjects' contrast and the retrieval loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from deepssim import DeepSSIMError
from deepssim.cli import main
from deepssim.training import synthetic as ss
from deepssim.training import train as training
from deepssim.training.augment import AUGMENTATION_FAMILIES, augment_batch
from deepssim.training.pairs import KIND_SHARES, kind_shares, sample_pairs
from deepssim.training.train import TrainSettings, train
from tests.test_train import volume_pool  # noqa: F401 - the fixture


def _blob(size: int = 40) -> torch.Tensor:
    rows, columns = np.mgrid[:size, :size]
    image = np.exp(-((rows - size / 2) ** 2 + (columns - size / 3) ** 2) / (size * 3.0))
    return torch.from_numpy(image).float().expand(8, 1, size, size).contiguous()


@pytest.mark.parametrize("family", list(AUGMENTATION_FAMILIES))
def test_every_family_is_seeded_and_joins_with_others(family):
    batch = _blob()
    views = augment_batch(batch, f"{family}+gamma", seed=5)
    assert torch.equal(views, augment_batch(batch, f"{family}+gamma", seed=5))
    assert torch.isfinite(views).all() and views.shape == batch.shape


def test_unknown_family_names_the_choices():
    with pytest.raises(DeepSSIMError, match="unknown augmentation family 'twirl'.*elastic"):
        augment_batch(_blob(), "flip+twirl")
    with pytest.raises(DeepSSIMError, match="augmentation family"):
        TrainSettings(augmentation="flip+twirl").check()


def test_frame_paints_a_thin_bright_border_and_leaves_the_inside():
    from deepssim.training.augment import RandomBorderFrame

    images = torch.rand(64, 1, 32, 32) * 0.5
    framed = RandomBorderFrame(p=1.0)(images)
    changed = (framed != images)[:, 0]
    assert not changed[:, 8:-8, 8:-8].any()  # at most 4 px inset + 2 px wide
    assert changed.any(dim=(1, 2)).all()  # every image got its frame (p = 1)
    assert (framed.amax(dim=(1, 2, 3)) <= images.amax(dim=(1, 2, 3)) + 1e-6).all()


def test_elastic_moves_pixels_a_little_and_keeps_the_structure():
    from deepssim.training.augment import RandomSmoothDisplacement

    torch.manual_seed(0)
    image = _blob(64)
    moved = RandomSmoothDisplacement(max_pixels=2.0, p=1.0)(image)
    assert not torch.equal(moved, image)
    for a, b in zip(image[:, 0].numpy(), moved[:, 0].numpy(), strict=True):
        assert structural_similarity(a, b, data_range=1.0) > 0.8


def test_pair_kinds_are_chosen_and_renormalised(volume_pool):  # noqa: F811
    shares = kind_shares("copy,deform")
    assert set(shares) == {"copy", "deform"} and sum(shares.values()) == pytest.approx(1.0)
    assert shares["copy"] / shares["deform"] == pytest.approx(KIND_SHARES["copy"] / KIND_SHARES["deform"])
    assert kind_shares("all") == KIND_SHARES
    with pytest.raises(DeepSSIMError, match="unknown pair kind sideways"):
        kind_shares("copy,sideways")
    pool, groups, slice_index = volume_pool
    table = sample_pairs(pool, groups, slice_index, n_pairs=60, seed=2, kinds="copy,deform")
    assert set(table.kind.tolist()) <= {"copy", "deform"}
    everything = sample_pairs(pool, groups, slice_index, n_pairs=60, seed=2)
    assert "neighbour" in set(everything.kind.tolist())


def test_fixed_contrast_keeps_the_anatomy_and_makes_every_subject_t1_like():
    for seed in (1, 2, 3):
        fixed = ss._subject(seed, "t1")
        assert fixed.params["contrast"] == "T1"
        np.testing.assert_array_equal(fixed.brain, ss._subject(seed).brain)
    with pytest.raises(DeepSSIMError, match="synthetic_contrast"):
        TrainSettings(synthetic_contrast="sepia").check()


def test_ranking_loss_trains_and_the_pseudo_subjects_are_cached(tmp_path, monkeypatch):
    settings = TrainSettings(
        synthetic_subjects=3,
        slices_per_subject=9,
        n_pairs=48,
        batch_size=16,
        epochs=1,
        ranking_weight=1.0,
        val_fraction=0.34,
    )
    plain = train(None, tmp_path / "plain", TrainSettings(**{**settings.__dict__, "ranking_weight": 0.0}))
    ranked = train(None, tmp_path / "ranked", settings)
    assert np.isfinite(ranked.log[-1]["train_mse"])
    assert ranked.log[-1]["train_mse"] != plain.log[-1]["train_mse"]  # the retrieval loss took part

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the cached pseudo-subjects should have been used")

    monkeypatch.setattr(ss, "synthetic_subjects", no_synthesis)
    training.prepare_training_data(settings, tmp_path / "ranked")  # same identity: the cache serves


@pytest.mark.parametrize("loss", ["margin", "infonce"])
def test_ranking_loss_is_low_when_copies_find_their_own_image(loss):
    """A network whose embedding is the image itself retrieves each degraded copy: a loss far
    below that of a network that cannot tell images apart (the margin, or log of the gallery size)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    pool = np.stack([gaussian_filter(rng.normal(size=(24, 24)), 2.0) for _ in range(8)]).astype(np.float32)
    neighbours = np.array([[i + 1] if i + 1 < 8 else [-1] for i in range(8)])
    settings = TrainSettings(batch_size=16, augmentation="none", precision="float32", ranking_loss=loss)
    batch = type("Batch", (), {"first": np.array([0, 2, 4, 6])})()  # 4 anchors and their neighbours

    class Network(torch.nn.Module):
        input_channels = 1

        def __init__(self, blind: bool):
            super().__init__()
            self.blind = blind

        def forward(self, views):
            flat = views.flatten(1)
            return torch.ones_like(flat) if self.blind else flat

    seeing = training._ranking_loss(Network(False), pool, neighbours, batch, settings, seed=0)
    blind = training._ranking_loss(Network(True), pool, neighbours, batch, settings, seed=0)
    chance = np.log(8) if loss == "infonce" else settings.ranking_margin  # 4 anchors + 4 neighbours
    assert blind.item() == pytest.approx(chance, abs=1e-4)
    assert seeing.item() < 0.1 * blind.item()


def test_cli_refuses_bad_training_choices(tmp_path, capsys):
    for flag, value in (
        ("--pair-kinds", "copy,sideways"),
        ("--ranking-weight", "-1"),
        ("--augmentation", "twirl"),
        ("--synthetic-contrast", "sepia"),
    ):
        try:
            code = main(["train", "--synthetic-subjects", "2", "--out", str(tmp_path / "run"), flag, value])
        except SystemExit as exit_info:  # argparse refuses a value outside the choices
            code = exit_info.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_every_study_arm_is_a_valid_setting_in_its_own_folder(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import augmentation_study as study

    budget = {"synthetic_subjects": 2, "slices_per_subject": 3, "n_pairs": 10, "epochs": 1, "seed": 0}
    folders = set()
    for arm in study.ARMS:
        settings = study.settings_of(arm, budget)
        settings.check()
        baseline = study.settings_of("baseline", budget).__dict__
        changed = {k for k, v in settings.__dict__.items() if v != baseline[k]}
        assert changed <= set(study.ARMS[arm][0]) and (changed or arm == "baseline"), arm
        folders.add(study.arm_folder(tmp_path, arm))
    assert len(folders) == len(study.ARMS)
    fake = {
        "arm": "baseline",
        "signed_error_by_kind": {"aligned:neighbour_slice": 0.2},
        **{key: 0.5 for key, _, _ in study.COLUMNS},
    }
    study.report(tmp_path, [fake, {**fake, "arm": "+ frame", "recall_at_1": 0.9}], budget, "test CPU")
    table = (tmp_path / "results.md").read_text()
    assert "| + frame | augmentation=flip+rotate+translate+gamma+frame | 0.90 |" in table
    assert (tmp_path / "augmentation_study.png").stat().st_size > 1000
