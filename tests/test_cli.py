"""The ``deepssim ssim-matrix`` command end to end, as a user runs it."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from deepssim import SimilarityMatrix, load_images
from deepssim.cli import main
from tests.helpers import EXAMPLE, smooth_image
from tests.test_ssim import reference_matrix

ON_EXAMPLE = ("ssim-matrix", "--train", str(EXAMPLE / "train"), "--generated", str(EXAMPLE / "generated"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepssim.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_ssim_matrix_on_the_bundled_example(tmp_path):
    out = tmp_path / "result" / "matrix.npz"
    done = run_cli(
        *ON_EXAMPLE,
        "--out",
        str(out),
        "--top-k",
        "2",
        "--dtype",
        "float64",
    )
    assert done.returncode == 0, done.stderr
    assert "16 training x 18 generated" in done.stdout
    result = SimilarityMatrix.load(out)
    train_keys, train = load_images(EXAMPLE / "train")
    generated_keys, generated = load_images(EXAMPLE / "generated")
    assert result.train_keys == train_keys and result.generated_keys == generated_keys
    assert result.settings["dtype"] == "float64" and result.settings["image_shape"] == [128, 128]
    np.testing.assert_allclose(result.values, reference_matrix(train, generated), atol=1e-5)

    with open(out.with_suffix(".top2.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(generated_keys)
    for j, key in enumerate(generated_keys):
        best = np.argsort(-result.values[:, j])[:2]
        mine = [r for r in rows if r["generated_key"] == key]
        assert [r["train_key"] for r in mine] == [train_keys[i] for i in best]
        assert float(mine[0]["ssim"]) == pytest.approx(result.values[best[0], j], abs=1e-6)
    # the planted near-copies find their source
    with open(EXAMPLE / "planted.csv") as handle:
        planted = [r for r in csv.DictReader(handle) if r["kind"] == "duplicate"]
    for row in planted:
        top = next(r for r in rows if r["generated_key"] == row["generated_key"] and r["rank"] == "1")
        assert top["train_key"] == row["source_train_key"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty", "no supported images"),
        ("mixed_shapes", "different shapes"),
        ("constant", "constant"),
    ],
)
def test_user_errors_exit_nonzero_without_traceback(tmp_path, setup, message):
    rng = np.random.default_rng(0)
    train, generated = tmp_path / "train", tmp_path / "generated"
    train.mkdir()
    generated.mkdir()
    np.save(train / "r.npy", smooth_image(rng, (12, 12)))
    if setup == "mixed_shapes":
        np.save(generated / "a.npy", smooth_image(rng, (12, 12)))
        np.save(generated / "b.npy", smooth_image(rng, (14, 12)))
    elif setup == "constant":
        np.save(generated / "flat.npy", np.ones((12, 12)))
    out = tmp_path / "out.npz"
    done = run_cli("ssim-matrix", "--train", str(train), "--generated", str(generated), "--out", str(out))
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_size_option_and_skip_bad(tmp_path, capsys):
    rng = np.random.default_rng(1)
    train, generated = tmp_path / "train", tmp_path / "generated"
    train.mkdir()
    generated.mkdir()
    np.save(train / "r.npy", smooth_image(rng, (12, 12)))
    np.save(generated / "a.npy", smooth_image(rng, (15, 11)))
    np.save(generated / "flat.npy", np.ones((12, 12)))
    out = tmp_path / "out.npz"
    code = main(
        [
            "ssim-matrix",
            "--train",
            str(train),
            "--generated",
            str(generated),
            "--out",
            str(out),
            "--size",
            "12x12",
            "--skip-bad",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "skipped 1 bad image" in capsys.readouterr().err
    result = SimilarityMatrix.load(out)
    assert result.generated_keys == ["a"] and result.values.shape == (1, 1)
    assert result.settings["generated_skipped"] == 1


def test_bad_output_name_and_foreign_matrix_file(tmp_path):
    done = run_cli(
        *ON_EXAMPLE,
        "--out",
        str(tmp_path / "m.csv"),
    )
    assert done.returncode == 2 and "must end in .npz" in done.stderr
    (tmp_path / "foreign.npz").write_bytes(b"not a zip")
    from deepssim import DeepSSIMError

    with pytest.raises(DeepSSIMError, match="not an SSIM matrix file"):
        SimilarityMatrix.load(tmp_path / "foreign.npz")


def test_output_folder_that_cannot_be_created_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should go")
    done = run_cli(
        "scan",
        "--train",
        str(EXAMPLE / "train"),
        "--generated",
        str(EXAMPLE / "generated"),
        "--metric",
        "ssim",
        "--no-cache",
        "--no-progress",
        "--out",
        str(blocker / "scan"),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot write" in done.stderr and "choose another --out" in done.stderr


def test_scan_command_with_patients_label_free_threshold_and_anonymised_report(tmp_path):
    """The README's scan command with its trust options: every planted copy is a Duplicate
    (registered SSIM decides), patients are counted, and the anonymised report holds no image.
    (With 16 training images a 10% false-positive rate is a low threshold: look-alike slices of
    other subjects may be called Duplicates, as the rate allows.)"""
    out = tmp_path / "scan"
    done = run_cli(
        "scan",
        "--train",
        str(EXAMPLE / "train"),
        "--generated",
        str(EXAMPLE / "generated"),
        "--out",
        str(out),
        "--group-by",
        r"^(ants|dwi|itk|kmeans|mni)",
        "--duplicate-fpr",
        "0.1",
        "--anonymise",
        "--no-cache",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "patients (^(ants|dwi|itk|kmeans|mni)) with at least one Duplicate" in done.stdout
    with open(out / "results.csv") as handle:
        rows = {row["generated_key"]: row for row in csv.DictReader(handle)}
    with open(EXAMPLE / "planted.csv") as handle:
        planted = {row["generated_key"]: row for row in csv.DictReader(handle)}
    for key, row in planted.items():
        if row["kind"].startswith("duplicate"):
            assert rows[key]["class"] == "Duplicate", key
    html = (out / "report.html").read_text()
    assert "Anonymised report: no image of any patient is included" in html
    assert "alt='generated" not in html and "alt='training" not in html
    assert (
        "id='patient-table'" in html
        and "id='audit-table'" in html
        and "fpr 0.1 from 5 training groups" in html
    )
    assert (out / "groups.csv").is_file()
