"""The volume scan (scan --unit volume): whole copies, copied slabs, orientation, clean errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from deepssim.cli import main
from deepssim.errors import DeepSSIMError
from deepssim.io.volumes import VolumeSet
from deepssim.scanning.decide import Thresholds
from deepssim.scanning.volumes import VolumeScanSettings, copied_slabs, scan_volumes
from tests.helpers import phantom_volume, write_nifti


def _moved(volume, degrees, shift):
    """A rigid move made with scipy (independent of the package's warp): rotation about axis 0."""
    rotated = ndimage.rotate(volume, degrees, axes=(1, 2), reshape=False, order=1, mode="constant")
    return ndimage.shift(rotated, shift, order=1, mode="constant")


@pytest.fixture(scope="module")
def volume_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    train, generated = root / "train", root / "generated"
    train.mkdir()
    generated.mkdir()
    subjects = [phantom_volume(seed) for seed in range(4)]
    for n, volume in enumerate(subjects):
        write_nifti(train / f"sub-{n}_T1.nii.gz", volume)
    rng = np.random.default_rng(1)
    copy = _moved(subjects[1], 6.0, (1.5, -2.0, 1.0)) + rng.normal(0, 0.01, subjects[1].shape)
    write_nifti(generated / "gen_copy.nii.gz", copy)
    slab = phantom_volume(40)
    slab[:, :, 12:25] = subjects[2][:, :, 12:25]  # axial slices 12-24 of subject 2, the rest another head
    write_nifti(generated / "gen_slab.nii.gz", slab)
    write_nifti(generated / "gen_other.nii.gz", phantom_volume(41))
    # subject 3 stored in LPS order (x and y reversed, the affine saying so): the same anatomy
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [35.0, 35.0, 0.0]
    write_nifti(generated / "gen_lps.nii.gz", subjects[3][::-1, ::-1, :], affine=lps)
    return train, generated


def test_whole_copies_slabs_and_orientation(volume_folders, tmp_path, capsys):
    train, generated = volume_folders
    out = tmp_path / "out"
    command = ["scan", "--unit", "volume", "--train", str(train), "--generated", str(generated)]
    command += ["--out", str(out), "--no-progress", "-k", "2", "--group-by", r"(sub-\d+)"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "4 generated volumes against 4 training volumes" in printed
    with open(out / "results.csv", newline="") as handle:
        rows = {row["generated_key"]: row for row in csv.DictReader(handle)}
    assert rows["gen_copy"]["class"] == "Duplicate" and rows["gen_copy"]["top1_train_key"] == "sub-1_T1"
    assert float(rows["gen_copy"]["decision_score"]) > float(rows["gen_copy"]["top1_ssim3d"]) + 0.1
    assert rows["gen_lps"]["class"] == "Duplicate" and rows["gen_lps"]["top1_train_key"] == "sub-3_T1"
    assert float(rows["gen_lps"]["decision_score"]) > 0.99  # canonical reading: the same voxels
    assert rows["gen_other"]["class"] != "Duplicate" and not rows["gen_other"]["copied_slabs"]
    assert rows["gen_slab"]["class"] == "Similar" and rows["gen_slab"]["top1_train_key"] == "sub-2_T1"
    slab = rows["gen_slab"]["copied_slabs"]  # "axial 12-24 (1.000)": the planted slices
    assert slab.startswith("axial 12-24 ("), slab
    with open(out / "slices.csv", newline="") as handle:
        slices = [r for r in csv.DictReader(handle) if r["generated_key"] == "gen_slab"]
    scores = {int(r["slice"]): float(r["ssim"]) for r in slices}
    assert scores[18] > 0.95 and scores[min(scores)] < 0.6  # inside the slab, and far outside it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"]["Duplicate"]["count"] == 2 and summary["volumes_with_a_copied_slab"] >= 1
    assert summary["thresholds"]["score"] == "registered-ssim-3d"
    with open(out / "groups.csv", newline="") as handle:
        groups = {r["group"]: r for r in csv.DictReader(handle)}
    assert groups["sub-1"]["generated_volumes_with_a_duplicate"] == "1"
    report = (out / "report.html").read_text()
    flagged = sum(row["class"] != "Different" for row in rows.values())
    assert report.count("data:image/png;base64,") == flagged >= 3  # the two copies and the slab
    with open(out / "pairs.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4 * 2


def test_copied_slabs_are_runs_of_slices_above_the_threshold():
    scores = np.array([np.nan, 0.9, 0.95, 0.2, 0.9, 0.91, 0.92, 0.93, 0.94, np.nan])
    assert copied_slabs(scores, 0.85, 5) == [(4, 8, pytest.approx(0.92))]
    assert copied_slabs(scores, 0.85, 2) == [(1, 2, pytest.approx(0.925)), (4, 8, pytest.approx(0.92))]


def test_patients_by_folder_or_volume(tmp_path):
    from deepssim.scanning.volumes import _group_of_each_volume

    for patient in ("sub-1", "sub-2"):
        (tmp_path / patient).mkdir()
        for session in ("a", "b"):
            write_nifti(tmp_path / patient / f"{session}.nii.gz", phantom_volume(len(session), (12, 12, 12)))
    volumes = VolumeSet.index(tmp_path, "training")
    assert _group_of_each_volume(volumes, "folder") == ["sub-1", "sub-1", "sub-2", "sub-2"]
    assert _group_of_each_volume(volumes, "volume") == ["sub-1/a", "sub-1/b", "sub-2/a", "sub-2/b"]
    assert _group_of_each_volume(volumes, r"(sub-\d)/") == ["sub-1", "sub-1", "sub-2", "sub-2"]
    with pytest.raises(DeepSSIMError, match="capturing group"):
        VolumeScanSettings(group_by="sub-")


def test_thresholds_of_another_score_are_refused(volume_folders):
    train, generated = volume_folders
    with pytest.raises(DeepSSIMError, match="registered-ssim-3d"):
        scan_volumes(train, generated, thresholds=Thresholds(0.6, 0.85, "file", score="registered-ssim"))


def test_bad_volume_inputs_get_one_clear_error(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    write_nifti(good / "a.nii.gz", phantom_volume(0, (16, 16, 16)))

    def refused(folder, expected):
        command = ["scan", "--unit", "volume", "--train", str(good), "--generated", str(folder)]
        assert main(command + ["--out", str(tmp_path / "out"), "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert expected in error and "Traceback" not in error
        assert not (tmp_path / "out").exists()

    flat = tmp_path / "flat"
    flat.mkdir()
    write_nifti(flat / "slice.nii.gz", np.ones((16, 16)))
    refused(flat, "a 2D image")
    series = tmp_path / "series"
    series.mkdir()
    write_nifti(series / "fmri.nii.gz", np.ones((16, 16, 16, 3)))
    refused(series, "4D series")
    coarse = tmp_path / "coarse"
    coarse.mkdir()
    write_nifti(coarse / "b.nii.gz", phantom_volume(1, (16, 16, 16)), zooms=(2.0, 2.0, 2.0))
    refused(coarse, "--spacing")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_nifti(mixed / "c.nii.gz", phantom_volume(1, (16, 16, 16)))
    write_nifti(mixed / "d.nii.gz", phantom_volume(2, (16, 16, 16)), zooms=(1.0, 1.0, 3.0))
    refused(mixed, "different voxel sizes")
    png = tmp_path / "png"
    png.mkdir()
    (png / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    refused(png, "compares whole 3D volumes")
    command = ["scan", "--unit", "volume", "--train", str(good), "--generated", str(good)]
    assert main(command + ["--out", str(tmp_path / "o"), "--release-dir", str(tmp_path / "r")]) == 2
    assert "--release-dir is for the image scan" in capsys.readouterr().err


def test_spacing_resamples_both_sets_to_one_grid(tmp_path):
    fine, coarse = tmp_path / "fine", tmp_path / "coarse"
    fine.mkdir()
    coarse.mkdir()
    write_nifti(fine / "a.nii.gz", phantom_volume(0, (32, 32, 32)))
    write_nifti(coarse / "b.nii.gz", phantom_volume(0, (16, 16, 16)), zooms=(2.0, 2.0, 2.0))
    first = VolumeSet.index(fine, "training", (2.0, 2.0, 2.0))
    second = VolumeSet.index(coarse, "generated", (2.0, 2.0, 2.0))
    first.check_matches(second)
    assert first.shape == second.shape == (16, 16, 16)
    assert first.read(0).shape == (16, 16, 16)


def test_the_foreground_score_counts_only_what_stays_in_view():
    """A head that fills its grid loses its faces when moved back: that loss is not a difference."""
    from deepssim.scanning.volumes import foreground_ssim3d, in_view
    from deepssim.ssim.registered3d import RigidTransform3D, VolumeRegistration, warp_volume

    rng = np.random.default_rng(5)
    texture = ndimage.gaussian_filter(rng.normal(size=(32, 32, 32)), 1.5)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))
    head = np.where((grid**2).sum(axis=0) < 1.5, 0.2 + (texture - texture.min()) / np.ptp(texture), 0.0)
    move = RigidTransform3D((), (0.0, 0.0, 0.0), (3.0, -2.0, 2.0))  # whole voxels: an exact move
    moved = warp_volume(head, move)
    back = VolumeRegistration(0.9, 0.1, move.inverse())  # the registration that undoes it
    aligned = warp_volume(moved, back.transform)
    valid = in_view(moved, back)
    np.testing.assert_array_equal(aligned[valid], head[valid])  # the same voxels wherever in view
    in_view_score, whole_score = foreground_ssim3d(head, aligned, valid), foreground_ssim3d(head, aligned)
    # (not 1: each volume is z-scored whole, filled faces included)
    assert in_view_score > 0.85 and in_view_score > whole_score + 0.1
