"""Baseline metrics, the evaluation protocol, the benchmark builder and the Dar baseline."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from deepssim import DeepSSIMError, load_images
from deepssim.cli import main
from deepssim.evaluation.builder import BenchmarkSettings, build_benchmark
from deepssim.evaluation.protocol import EvaluateSettings, classification_numbers, evaluate, misaligned_views
from deepssim.labels import Label
from deepssim.metrics import load_metric
from deepssim.metrics.dar import DarMetric, nt_xent
from deepssim.metrics.pixel import FSIMMetric
from deepssim.metrics.semdedup import SemDeDupMetric
from deepssim.metrics.sscd import SSCDMetric
from deepssim.scanning.decide import Thresholds, classify
from deepssim.scanning.scan import scan
from deepssim.training.dar import DarSettings, train_dar
from tests.helpers import EXAMPLE
from tests.test_ssim import reference_matrix


@pytest.fixture(scope="module")
def example_images():
    return load_images(EXAMPLE / "train")[1]


def test_fsim_is_the_published_fsim(example_images, rng):
    import piqa

    train = example_images[:4]
    noisy = train + rng.normal(0, 10, train.shape)
    ours = FSIMMetric().pair_scores(train, noisy)

    def unit(x):
        return torch.from_numpy(
            (x - x.min(axis=(1, 2), keepdims=True)) / np.ptp(x, axis=(1, 2), keepdims=True)
        )

    reference = piqa.FSIM(chromatic=False, reduction="none")(
        unit(train).float().unsqueeze(1).repeat(1, 3, 1, 1),
        unit(noisy).float().unsqueeze(1).repeat(1, 3, 1, 1),
    )
    np.testing.assert_allclose(ours, reference.numpy(), atol=1e-4)
    assert FSIMMetric().pair_scores(train[:1], train[:1])[0] == pytest.approx(1.0, abs=1e-5)


def test_ssim_metric_is_scikit_image(example_images):
    scores = load_metric("ssim").pair_scores(example_images[:3], example_images[3:6])
    np.testing.assert_allclose(
        scores, np.diag(reference_matrix(example_images[:3], example_images[3:6])), atol=1e-8
    )


def test_sscd_loads_a_torchscript_descriptor(tmp_path, example_images):
    class Descriptor(torch.nn.Module):  # the published SSCD's interface: (B,3,H,W) -> (B,512)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 512, 8, stride=8)

        def forward(self, x):
            return torch.nn.functional.normalize(self.conv(x).mean(dim=(2, 3)), dim=1)

    torch.manual_seed(0)
    network = Descriptor().eval()
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.script(network).save(str(path))
    metric = load_metric(f"sscd={path}")
    assert isinstance(metric, SSCDMetric) and metric.thresholds == (0.4, 0.6)
    image = example_images[0]
    unit = (image - image.min()) / np.ptp(image)
    batch = torch.nn.functional.interpolate(
        torch.from_numpy(unit).float()[None, None], size=(288, 288), mode="bilinear", antialias=True
    ).repeat(1, 3, 1, 1)
    batch = (batch - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = network(batch).numpy()
    np.testing.assert_allclose(metric.embed(image[None]), expected, atol=1e-5)
    with pytest.raises(DeepSSIMError, match="not a TorchScript file"):
        load_metric(f"sscd={EXAMPLE / 'planted.csv'}")
    with pytest.raises(DeepSSIMError, match="needs its weights file"):
        load_metric("sscd")


def test_semdedup_loads_open_clip_weights_from_a_local_file(tmp_path, example_images):
    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    weights = tmp_path / "tiny.bin"
    torch.save(model.state_dict(), weights)
    metric = load_metric(f"semdedup=tiny-clip-test:{weights}")
    assert isinstance(metric, SemDeDupMetric) and metric.thresholds == (0.97, 0.99905)
    embeddings = metric.embed(example_images[:2])
    assert embeddings.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert metric.pair_scores(example_images[:1], example_images[:1])[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(DeepSSIMError, match="not found"):
        load_metric(f"semdedup=tiny-clip-test:{tmp_path / 'missing.bin'}")


def test_dar_training_checkpoint_and_pearson_similarity(tmp_path, example_images):
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    logits = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = logits @ logits.T / 0.07
    logits.fill_diagonal_(-1e9)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))
    assert nt_xent(z1, z2).item() == pytest.approx(expected.item(), rel=1e-5)
    small = example_images[:6, 32:96, 32:96]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(small):
        np.save(folder / f"{i}.npy", image)
    path = train_dar(folder, tmp_path / "dar", DarSettings(epochs=1, batch_size=3, precision="float32"))
    metric = load_metric(f"dar={path}")
    assert isinstance(metric, DarMetric) and metric.thresholds == (0.8030425, 0.8030425)
    with torch.no_grad():
        raw = metric.network(metric.prepare(torch.from_numpy(small[:2]).float().unsqueeze(1))).numpy()
    pearson = np.corrcoef(raw[0], raw[1])[0, 1]
    assert metric.pair_scores(small[:1], small[1:2])[0] == pytest.approx(pearson, abs=1e-4)
    with pytest.raises(DeepSSIMError, match="needs .safetensors and .json"):
        load_metric(f"dar={EXAMPLE / 'planted.csv'}")
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(path.read_bytes())
    foreign.with_suffix(".json").write_text(json.dumps({"format": "deepssim-checkpoint"}))
    with pytest.raises(DeepSSIMError, match="not a Dar checkpoint"):
        load_metric(f"dar={foreign}")


def test_misaligned_views_are_seeded_and_shared(example_images):
    views = misaligned_views(example_images[:4], seed=5)
    np.testing.assert_array_equal(views, misaligned_views(example_images[:4], seed=5))
    assert not np.allclose(views, misaligned_views(example_images[:4], seed=6))


def test_classification_numbers_match_scikit_learn(rng):
    labels = rng.integers(0, 3, 200)
    scores = 0.3 * labels + rng.normal(0.3, 0.2, 200)
    thresholds = Thresholds(0.6, 0.85)
    numbers = classification_numbers(scores, labels, thresholds)
    predicted = classify(scores, thresholds)
    assert numbers["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert numbers["auroc"] == pytest.approx(roc_auc_score(labels == Label.DUPLICATE, scores))

    duplicate = labels == Label.DUPLICATE
    negatives, positives = (~duplicate).sum(), duplicate.sum()
    best = 0.0
    for cut in np.unique(scores):  # every operating point with at most 5% false positives
        flagged = scores >= cut
        if (flagged & ~duplicate).sum() / negatives <= 0.05:
            best = max(best, (flagged & duplicate).sum() / positives)
    assert numbers["tpr_at_5fpr"] == pytest.approx(best)


def test_benchmark_build_and_evaluate_end_to_end(tmp_path):
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    import nibabel as nib

    from tests.helpers import SOURCES

    data = np.asarray(nib.load(SOURCES / "KmeansTest_T1UCharRaw.nii.gz").get_fdata())[32:96, 32:96]
    for name, part in (
        ("subject_a", data[..., 20:34]),
        ("subject_b", data[..., 34:48]),
        ("subject_c", data[:, ::-1, 20:34]),
    ):
        nib.save(nib.Nifti1Image(part.astype(np.float32), np.eye(4)), volumes / f"{name}.nii.gz")
    out = tmp_path / "bench"
    summary = build_benchmark(volumes, out, BenchmarkSettings(duplicates=8, similar=9, different=8, seed=1))
    assert summary["pairs_by_label"] == {"Different": 8, "Duplicate": 8, "Similar": 9}
    with open(out / "pairs.csv", newline="") as handle:
        pairs = list(csv.DictReader(handle))
    assert {p["split"] for p in pairs} == {"calib", "test"}
    assert {p["kind"] for p in pairs} >= {"degraded_copy", "neighbour_slice", "deformed", "blend"}
    settings = EvaluateSettings(
        metrics=("ssim", "fsim"), calib_split="calib", test_split="test", bootstrap=20
    )
    rows = evaluate(
        out / "pairs.csv",
        out / "train",
        out / "generated",
        settings=settings,
        out_dir=tmp_path / "evaluation",
    )
    ssim_rows = [r for r in rows if r["metric"] == "ssim"]
    assert {(r["setting"], r["thresholds"]) for r in ssim_rows} == {
        ("aligned", "paper"),
        ("aligned", "calibrated"),
        ("misaligned", "paper"),
        ("misaligned", "calibrated"),
    }
    assert {(r["metric"], r["thresholds"]) for r in rows if r["metric"] == "fsim"} == {("fsim", "calibrated")}
    for row in rows:
        assert row["macro_f1_ci_low"] <= row["macro_f1"] + 1e-9 or np.isnan(row["macro_f1_ci_low"])
    files = {p.name for p in (tmp_path / "evaluation").iterdir()}
    assert {"metrics.csv", "metrics.md", "scores.csv", "histogram_ssim_misaligned.png"} <= files
    aligned_duplicates = [r for r in rows if r["metric"] == "ssim" and r["setting"] == "aligned"][0]
    assert aligned_duplicates["recall_Duplicate"] > 0.5  # degraded copies are clear in pixel space


def test_evaluate_command_and_fsim_scan_refusal(tmp_path, capsys):
    planted = EXAMPLE / "planted.csv"
    labels = {"duplicate": 1, "duplicate_misaligned": 1, "similar": 2, "different": 0}
    pairs = tmp_path / "pairs.csv"
    with open(planted, newline="") as handle, open(pairs, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["train_key", "generated_key", "label"])
        for row in csv.DictReader(handle):
            if row["source_train_key"]:
                writer.writerow([row["source_train_key"], row["generated_key"], labels[row["kind"]]])
    args = [
        "evaluate",
        "--pairs",
        str(pairs),
        "--train",
        str(EXAMPLE / "train"),
        "--generated",
        str(EXAMPLE / "generated"),
    ]
    assert (
        main([*args, "--metrics", "ssim", "--bootstrap", "10", "--out", str(tmp_path / "e"), "--no-progress"])
        == 0
    )
    assert "| ssim | misaligned | paper |" in capsys.readouterr().out
    assert main([*args, "--metrics", "ssim,bogus", "--out", str(tmp_path / "f")]) == 2
    assert "unknown metric 'bogus'" in capsys.readouterr().err
    with pytest.raises(DeepSSIMError, match="matched pairs only"):
        scan(EXAMPLE / "train", EXAMPLE / "generated", metric="fsim", thresholds=(0.5, 0.9))


def test_evaluate_settings_are_validated_once_and_recorded(tmp_path):
    with pytest.raises(DeepSSIMError, match="setting must be one of aligned, misaligned, both"):
        EvaluateSettings(setting="sideways")
    with pytest.raises(DeepSSIMError, match="bootstrap"):
        EvaluateSettings(bootstrap=-1)
    assert EvaluateSettings(setting="misaligned").views == ("misaligned",)
