"""Thresholds belong to one score (issue 22): calibrate fits the score the scan decides with, the
file names it, a scan refuses a file made for another score, and defaults follow the image size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from deepssim import DeepSSIMError, Label, scan
from deepssim.cli import main
from deepssim.io.load import LoadOptions
from deepssim.labelling import LabelStore
from deepssim.labelling.server import LabellingSession
from deepssim.scanning.decide import REGISTERED_SSIM, Thresholds, calibrate, classify, default_thresholds
from tests.helpers import EXAMPLE, SUBJECT_GROUPS, planted, read_csv

PLANTED = planted()


def _truth(train_key: str, generated_key: str) -> str:
    """The planted label of a (training, generated) pair of the bundled example."""
    planted = PLANTED[generated_key]
    if planted["kind"].startswith("duplicate"):
        return "Duplicate" if planted["source_train_key"] == train_key else "Different"
    return (
        "Similar"
        if planted["kind"] == "similar" and planted["source_train_key"] == train_key
        else "Different"
    )


def test_thresholds_out_of_range_are_refused(capsys):
    with pytest.raises(DeepSSIMError, match="no score can exceed"):
        Thresholds(0.6, 1.0)
    with pytest.raises(DeepSSIMError, match="below every score's range"):
        Thresholds(-1.5, 0.8)
    with pytest.raises(DeepSSIMError, match="finite"):
        Thresholds(float("nan"), 0.8)
    train, generated = EXAMPLE / "train", EXAMPLE / "generated"
    for flags in (["--high", "2"], ["--low", "-1.5"], ["--low", "0.9", "--high", "0.8"]):
        code = main(["scan", "--train", str(train), "--generated", str(generated), "--out", "unused", *flags])
        assert code == 2
        assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback


def test_vectorised_calibration_matches_an_exhaustive_scikit_learn_search(rng):
    labels = rng.integers(0, 3, 60)
    scores = 0.2 * labels + rng.normal(0.3, 0.12, 60)
    found, f1 = calibrate(scores, labels)
    present = sorted(set(labels.tolist()))
    cuts = np.unique(np.concatenate([scores - 1e-9, scores + 1e-9]))
    best = max(
        f1_score(labels, classify(scores, Thresholds(low, high)), labels=present, average="macro")
        for i, low in enumerate(cuts)
        for high in cuts[i:]
    )
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1 == pytest.approx(
        f1_score(labels, classify(scores, found), labels=present, average="macro"), abs=1e-12
    )


def test_registered_defaults_rise_below_128_pixels():
    assert default_thresholds(REGISTERED_SSIM, (128, 128), None).high == pytest.approx(0.85)
    assert default_thresholds(REGISTERED_SSIM, (256, 200), None).high == pytest.approx(0.85)
    assert default_thresholds(REGISTERED_SSIM, (64, 64), None).high == pytest.approx(0.89)
    assert default_thresholds(REGISTERED_SSIM, (32, 32), None).high == pytest.approx(0.93)
    assert default_thresholds("ssim", (64, 64), (0.6, 0.85)).high == 0.85  # the paper's, for plain SSIM


def test_label_calibrate_scan_workflow_uses_the_score_the_scan_decides_with(tmp_path, capsys):
    """label -> calibrate --labels -> scan --thresholds, as the README describes it; and a file
    for another score is refused with a line that says how to make the right one."""
    train, generated = EXAMPLE / "train", EXAMPLE / "generated"
    scan(train, generated, k=3, cache=False).save(tmp_path / "scan", report=False)
    session = LabellingSession(tmp_path / "scan", tmp_path / "labels", rater="ann", pairs=54)
    for position, pair in enumerate(session.queue):
        session.store.record("ann", position, _truth(pair.train_key, pair.generated_key))
    thresholds_file = tmp_path / "thresholds.json"
    labels = ["--labels", str(tmp_path / "labels"), "--no-progress", "--bootstrap", "20"]
    assert main(["calibrate", *labels, "--out", str(thresholds_file)]) == 0
    out, err = capsys.readouterr()
    assert "deepssim: warning: few labelled pairs per class (Similar 2" in err
    saved = json.loads(thresholds_file.read_text())
    assert saved["score"] == REGISTERED_SSIM and saved["image_shape"] == [128, 128]
    assert saved["low_ci95"][0] <= saved["low"] <= saved["low_ci95"][1]
    suggested = next(line for line in out.splitlines() if line.startswith("use them with: "))
    command = suggested.removeprefix("use them with: deepssim ").split()
    assert command[:3] == ["scan", "--train", str(train)] and "--decision" not in command
    assert main([*command, "--out", str(tmp_path / "rescan"), "--no-cache", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "rescan" / "summary.json").read_text())
    assert summary["thresholds"]["high"] == pytest.approx(saved["high"])

    other = tmp_path / "ssim-thresholds.json"
    assert main(["calibrate", *labels, "--metric", "ssim", "--out", str(other)]) == 0
    capsys.readouterr()
    rescan = ["scan", "--train", str(train), "--generated", str(generated), "--no-cache", "--no-progress"]
    assert main([*rescan, "--out", str(tmp_path / "refused"), "--thresholds", str(other)]) == 2
    error = capsys.readouterr().err
    assert "calibrated for ssim" in error and "deepssim calibrate" in error and error.count("\n") == 1
    assert not (tmp_path / "refused").exists()
    assert LabelStore.open(tmp_path / "labels").current()  # the labels are untouched


def test_thresholds_for_another_image_size_are_refused(tmp_path):
    saved = Thresholds(0.5, 0.8, "calibrated", score=REGISTERED_SSIM, image_shape=(64, 64))
    saved.save(tmp_path / "t.json")
    loaded = Thresholds.load(tmp_path / "t.json")
    with pytest.raises(DeepSSIMError, match="calibrated on 64x64 images, these are 128x128"):
        scan(EXAMPLE / "train", EXAMPLE / "generated", thresholds=loaded, cache=False)


def test_demo_at_64_pixels_calls_copies_and_only_copies_duplicates():
    """The bundled demo resized to 64x64, the case study's size: every planted copy is a Duplicate of
    its source, no other subject is, and the memorised count is one image per planted source."""
    options = LoadOptions(size=(64, 64), fit="resize")
    result = scan(
        EXAMPLE / "train", EXAMPLE / "generated", options=options, group_by=SUBJECT_GROUPS, cache=False
    )
    assert result.thresholds.high == pytest.approx(0.89)
    sources = set()
    for i, key in enumerate(result.generated_keys):
        planted = PLANTED[key]
        best = result.train_keys[result.neighbours[i, 0]]
        if planted["kind"].startswith("duplicate"):
            assert result.classes[i] == Label.DUPLICATE and best == planted["source_train_key"], key
            sources.add(best)
        else:
            assert result.classes[i] != Label.DUPLICATE, (key, result.evidence.ssim_registered[i, 0])
    memorised = result.summary.training_images_with_a_duplicate["count"]
    assert memorised == len(sources)
    duplicates = [(g, t) for g, t, _ in result.duplicates()]
    assert all(t == PLANTED[g]["source_train_key"] for g, t in duplicates)


def test_reidentification_flags_every_copy_of_its_patient_as_its_own_column(tmp_path):
    result = scan(
        EXAMPLE / "train", EXAMPLE / "generated", group_by=SUBJECT_GROUPS, reidentify=True, cache=False
    )
    copies = [
        i for i, key in enumerate(result.generated_keys) if PLANTED[key]["kind"].startswith("duplicate")
    ]
    assert result.reidentifies[copies].all()
    assert result.summary.reidentification["generated_images"]["count"] == int(result.reidentifies.sum())
    rows = read_csv(result.save(tmp_path / "out", report=False)["results"])
    assert [row["reidentifies"] == "yes" for row in rows] == result.reidentifies.tolist()
    assert {row["class"] for row in rows} <= set(Label.titles())  # not a class of its own
    with pytest.raises(DeepSSIMError, match="--reidentify needs --group-by"):
        scan(EXAMPLE / "train", EXAMPLE / "generated", reidentify=True)
