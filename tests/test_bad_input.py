"""Every option is checked before any work: a bad one is one line, ``deepssim: error: ...``, exit
status 2, no traceback, nothing written and no input touched (issue 23)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from deepssim.cli import main
from tests.helpers import EXAMPLE

SCAN = ["scan", "--no-cache", "--no-progress"]
MATRIX = ["ssim-matrix", "--no-progress"]


def tree(folder) -> dict:
    """Every file below ``folder`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def inputs(tmp_path):
    """A training and a generated folder (copies of the example), a NIfTI volume of 40 slices and a
    scan output folder, all under tmp_path."""
    import nibabel as nib

    shutil.copytree(EXAMPLE / "train", tmp_path / "train")
    shutil.copytree(EXAMPLE / "generated", tmp_path / "generated")
    rng = np.random.default_rng(0)
    (tmp_path / "volume").mkdir()
    volume = rng.normal(size=(24, 24, 40)).cumsum(0).cumsum(1) + 100
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), tmp_path / "volume" / "brain.nii.gz")
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "summary.json").write_text("{}")
    (tmp_path / "pairs.csv").write_text("train_key,generated_key,label\nants_r16,gen_copy_0,Duplicate\n")
    return tmp_path


def scan_args(root, *extra) -> list[str]:
    return [*SCAN, "--train", str(root / "train"), "--generated", str(root / "generated"), *extra]


def matrix_args(root, *extra) -> list[str]:
    train, generated = str(root / "train"), str(root / "generated")
    return [*MATRIX, "--train", train, "--generated", generated, "--out", str(root / "m.npz"), *extra]


CASES = {
    # ssim-matrix
    "block size negative": (
        lambda r: matrix_args(r, "--block-size", "-5"),
        "--block-size: must be at least 1",
    ),
    "block size zero": (lambda r: matrix_args(r, "--block-size", "0"), "--block-size: must be at least 1"),
    "matrix top-k negative": (lambda r: matrix_args(r, "--top-k", "-1"), "--top-k: must be at least 0"),
    "matrix out unwritable": (
        lambda r: [*matrix_args(r)[:-2], "--out", "/proc/deepssim/m.npz"],
        "cannot write --out /proc/deepssim/m.npz",
    ),
    "matrix slices outside the volume": (
        lambda r: (
            [*MATRIX, "--train", str(r / "volume"), "--generated", str(r / "volume")]
            + ["--out", str(r / "m.npz"), "--slices", "100:200"]
        ),
        "keeps no slice: it has 40 slices",
    ),
    # scan
    "scan top-k zero": (
        lambda r: scan_args(r, "--top-k", "0", "--out", str(r / "o")),
        "--top-k must be at least 1",
    ),
    "scan batch size zero": (
        lambda r: scan_args(r, "--batch-size", "0", "--out", str(r / "o")),
        "--batch-size must be at least 1",
    ),
    "scan gallery negative": (lambda r: scan_args(r, "--gallery", "-1", "--out", str(r / "o")), "--gallery"),
    "scan workers zero": (lambda r: scan_args(r, "--workers", "0", "--out", str(r / "o")), "--workers"),
    "scan shard size zero": (
        lambda r: scan_args(r, "--shard-size", "0", "--out", str(r / "o")),
        "--shard-size",
    ),
    "group-by two groups": (
        lambda r: scan_args(r, "--group-by", r"ants_r(\d+)|([a-z]+)", "--out", str(r / "o")),
        "has 2 capturing groups; it needs exactly one",
    ),
    "group-by no group": (
        lambda r: scan_args(r, "--group-by", "ants", "--out", str(r / "o")),
        "has no capturing group",
    ),
    "group-by bad regex": (
        lambda r: scan_args(r, "--group-by", "ants_r(", "--out", str(r / "o")),
        "nor a valid regex",
    ),
    "group-by group missing for a key": (
        lambda r: scan_args(r, "--group-by", r"ants_r(\d+)|[a-z]+", "--out", str(r / "o")),
        "matches the key 'dwi_s0_z5'",
    ),
    "scan out unwritable": (lambda r: scan_args(r, "--out", "/proc/x"), "cannot write --out /proc/x"),
    "scan out exists": (lambda r: scan_args(r, "--out", str(r / "scan")), "pass --overwrite"),
    "scan overwrite of a folder no scan wrote": (
        lambda r: scan_args(r, "--out", str(r / "volume"), "--overwrite"),
        "holds no scan output",
    ),
    "scan out inside an input": (
        lambda r: scan_args(r, "--out", str(r / "train" / "out"), "--overwrite"),
        "inside the input",
    ),
    "scan input inside out": (lambda r: scan_args(r, "--out", str(r), "--overwrite"), "is inside --out"),
    "release dir inside an input": (
        lambda r: scan_args(r, "--out", str(r / "o"), "--release-dir", str(r / "generated" / "r")),
        "inside the input",
    ),
    "release dir exists": (
        lambda r: scan_args(r, "--out", str(r / "o"), "--release-dir", str(r / "scan")),
        "already exists",
    ),
    "cache inside out": (
        lambda r: (
            [*scan_args(r, "--out", str(r / "o"))[:1], "--cache", str(r / "o" / "e.sqlite")]
            + scan_args(r, "--out", str(r / "o"))[3:]
        ),
        "keep the embedding cache elsewhere",
    ),
    "scan slices outside the volume": (
        lambda r: (
            [*SCAN, "--train", str(r / "volume"), "--generated", str(r / "volume")]
            + ["--out", str(r / "o"), "--slices", "100:200"]
        ),
        "keeps no slice: it has 40 slices",
    ),
    "low threshold above 1": (
        lambda r: scan_args(r, "--low", "1.5", "--out", str(r / "o")),
        "low threshold (1.5) is at or above every score",
    ),
    "high threshold below -1": (
        lambda r: scan_args(r, "--high", "-2", "--out", str(r / "o")),
        "high threshold (-2.0) is below every score's range",
    ),
    "low above high": (
        lambda r: scan_args(r, "--low", "0.9", "--high", "0.5", "--out", str(r / "o")),
        "must not exceed",
    ),
    "hash keys without anonymise": (
        lambda r: scan_args(r, "--hash-keys", "--out", str(r / "o")),
        "--anonymise",
    ),
    "min foreground above 1": (
        lambda r: scan_args(r, "--min-foreground", "2", "--out", str(r / "o")),
        "--min-foreground",
    ),
    "scan fit minutes zero": (
        lambda r: scan_args(r, "--fit-model", "--fit-minutes", "0", "--out", str(r / "o")),
        "must be positive",
    ),
    "unknown choice": (lambda r: scan_args(r, "--decision", "vote", "--out", str(r / "o")), "invalid choice"),
    # calibrate
    "calibrate out unwritable": (
        lambda r: (
            ["calibrate", "--pairs", str(r / "pairs.csv"), "--train", str(r / "train")]
            + ["--generated", str(r / "generated"), "--out", "/proc/x/t.json"]
        ),
        "cannot write --out",
    ),
    "calibrate out is a folder": (
        lambda r: (
            ["calibrate", "--pairs", str(r / "pairs.csv"), "--train", str(r / "train")]
            + ["--generated", str(r / "generated"), "--out", str(r / "scan")]
        ),
        "is a folder",
    ),
    "calibrate pairs missing": (
        lambda r: (
            ["calibrate", "--pairs", str(r / "none.csv"), "--train", str(r / "train")]
            + ["--generated", str(r / "generated"), "--out", str(r / "t.json")]
        ),
        "no such file",
    ),
    # evaluate
    "evaluate bootstrap negative": (
        lambda r: (
            ["evaluate", "--pairs", str(r / "pairs.csv"), "--train", str(r / "train")]
            + ["--generated", str(r / "generated"), "--out", str(r / "e"), "--bootstrap", "-1"]
        ),
        "bootstrap must be 0 or more",
    ),
    "evaluate out unwritable": (
        lambda r: (
            ["evaluate", "--pairs", str(r / "pairs.csv"), "--train", str(r / "train")]
            + ["--generated", str(r / "generated"), "--out", "/proc/x"]
        ),
        "cannot write --out /proc/x",
    ),
    # label
    "label port zero": (
        lambda r: ["label", "--scan", str(r / "scan"), "--out", str(r / "l"), "--port", "0"],
        "--port: must be between 1 and 65535",
    ),
    "label port too high": (
        lambda r: ["label", "--scan", str(r / "scan"), "--out", str(r / "l"), "--port", "70000"],
        "--port: must be between 1 and 65535",
    ),
    "label pairs zero": (
        lambda r: ["label", "--scan", str(r / "scan"), "--out", str(r / "l"), "--pairs", "0"],
        "--pairs: must be at least 1",
    ),
    "label bootstrap negative": (
        lambda r: ["label", "--summary", str(r / "scan"), "--bootstrap", "-3"],
        "--bootstrap: must be at least 0",
    ),
    "label out unwritable": (
        lambda r: ["label", "--scan", str(r / "scan"), "--out", "/proc/x"],
        "cannot write --out /proc/x",
    ),
    # fit
    "fit minutes zero": (
        lambda r: ["fit", "--train", str(r / "train"), "--out", str(r / "f"), "--minutes", "0"],
        "--minutes must be positive",
    ),
    "fit epochs zero": (
        lambda r: ["fit", "--train", str(r / "train"), "--out", str(r / "f"), "--epochs", "0"],
        "--epochs must be at least 1",
    ),
    "fit out unwritable": (
        lambda r: ["fit", "--train", str(r / "train"), "--out", "/proc/x"],
        "cannot write --out /proc/x",
    ),
    "embed batch size zero": (
        lambda r: ["embed", "--images", str(r / "train"), "--out", str(r / "e.npz"), "--batch-size", "0"],
        "--batch-size: must be at least 1",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_option_is_one_line_exit_2_nothing_written(case, inputs, capsys):
    make_args, message = CASES[case]
    before = tree(inputs)
    try:
        code = main(make_args(inputs))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepssim: error: "), err
    assert message in lines[0] and "Traceback" not in err
    assert tree(inputs) == before  # nothing written, no input touched
