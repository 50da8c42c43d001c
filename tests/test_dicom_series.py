"""A DICOM series folder read as one volume: LPS converted to RAS, the same canonical array as the
NIfTI file of the same head, clean errors, and a series as a volume of the volume scan."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from deepssim.cli import main
from deepssim.errors import DeepSSIMError
from deepssim.io.dicom_series import read_series, series_geometry
from deepssim.io.orientation import read_canonical
from deepssim.io.volumes import VolumeSet
from tests.helpers import phantom_volume, write_dicom_series, write_nifti

SPACING = (1.0, 1.5, 2.0)
SLOPE, INTERCEPT = 2.0, -100.0


def _head(seed: int, shape=(20, 24, 16)) -> np.ndarray:
    """A phantom whose values survive uint16 storage with slope 2 and intercept -100 exactly."""
    return SLOPE * np.round(phantom_volume(seed, shape) * 500) + INTERCEPT


@pytest.fixture(scope="module")
def head():
    return _head(0)


@pytest.fixture(scope="module")
def nifti(head, tmp_path_factory):
    return read_canonical(write_nifti(tmp_path_factory.mktemp("nifti") / "head.nii.gz", head, zooms=SPACING))


@pytest.mark.parametrize(
    "row, column, stored_as",
    [
        ((1, 0, 0), (0, 1, 0), "PLS"),  # axial slices, rows towards L, columns towards P
        ((0, -1, 0), (0, 0, -1), "IAL"),  # sagittal slices, the row direction flipped (towards A)
    ],
)
def test_a_series_reads_as_the_nifti_volume_of_the_same_head(head, nifti, tmp_path, row, column, stored_as):
    order = np.random.default_rng(3).permutation(head.shape[2] if stored_as == "PLS" else head.shape[0])
    folder = write_dicom_series(
        tmp_path / "series", head, SPACING, row, column, slope=SLOPE, intercept=INTERCEPT, file_order=order
    )
    volume = read_series(folder)
    assert volume.stored_as == stored_as
    np.testing.assert_array_equal(volume.data, nifti.data)
    assert volume.spacing == nifti.spacing == SPACING
    assert series_geometry(folder) == (head.shape, SPACING)
    coarse = read_series(folder, spacing=(2.0, 3.0, 4.0))
    assert coarse.data.shape == (10, 12, 8) and coarse.spacing == (2.0, 3.0, 4.0)


def test_series_errors_are_clear(head, tmp_path):
    two = tmp_path / "two"
    write_dicom_series(two, head, SPACING, slope=SLOPE, intercept=INTERCEPT, series_uid="1.2.3.1", name="a")
    write_dicom_series(two, head, SPACING, slope=SLOPE, intercept=INTERCEPT, series_uid="1.2.3.2", name="b")
    with pytest.raises(DeepSSIMError, match=r"two: 2 DICOM series in one folder .*its own folder"):
        read_series(two)
    unplaced = write_dicom_series(
        tmp_path / "unplaced", head, SPACING, slope=SLOPE, intercept=INTERCEPT, omit=("ImagePositionPatient",)
    )
    with pytest.raises(DeepSSIMError, match="no ImagePositionPatient"):
        series_geometry(unplaced)
    gap = write_dicom_series(tmp_path / "gap", head, SPACING, slope=SLOPE, intercept=INTERCEPT)
    (gap / "im007.dcm").unlink()  # a missing slice: 2 mm steps and one of 4 mm
    with pytest.raises(DeepSSIMError, match="not evenly spaced"):
        read_series(gap)


def test_the_volume_scan_reads_series_folders_as_volumes(tmp_path, capsys):
    train, generated = tmp_path / "train", tmp_path / "generated"
    train.mkdir()
    heads = [_head(seed, (24, 24, 24)) for seed in range(3)]
    for n, volume in enumerate(heads[:2]):
        write_nifti(train / f"sub-{n}.nii.gz", volume)
    write_dicom_series(generated / "sub-9" / "t1", heads[1], slope=SLOPE, intercept=INTERCEPT)
    write_nifti(generated / "other.nii.gz", heads[2])
    volumes = VolumeSet.index(generated, "generated")
    assert volumes.keys == ["other", "sub-9/t1"] and volumes.shape == (24, 24, 24)
    np.testing.assert_array_equal(volumes.read(1), heads[1])
    out = tmp_path / "out"
    command = ["scan", "--unit", "volume", "--train", str(train), "--generated", str(generated)]
    assert main(command + ["--out", str(out), "--no-progress", "-k", "1"]) == 0
    capsys.readouterr()
    with open(out / "results.csv", newline="") as handle:
        rows = {row["generated_key"]: row for row in csv.DictReader(handle)}
    assert rows["sub-9/t1"]["class"] == "Duplicate" and rows["sub-9/t1"]["top1_train_key"] == "sub-1"
    assert rows["other"]["class"] != "Duplicate"
