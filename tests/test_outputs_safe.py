"""Outputs safe to share and never stale (issue 23): the anonymised report shows nothing of anyone,
the release folder names no training image, and the scan's folder is complete or absent."""

from __future__ import annotations

import base64
import csv
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from deepssim import DeepSSIMError, load_images, ssim
from deepssim.cli import main
from deepssim.scanning import report as report_module
from deepssim.scanning.audit import key_hasher
from deepssim.scanning.evidence import block_difference, downsample, gallery_pairs
from deepssim.scanning.scan import scan
from tests.helpers import EXAMPLE, REPO

TRAIN, GENERATED = EXAMPLE / "train", EXAMPLE / "generated"
GROUPS = "^(ants_r[0-9]+|kmeans|mni|itk_[a-z0-9]+|dwi)"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@pytest.fixture(scope="module")
def result():
    return scan(TRAIN, GENERATED, cache=False, group_by=GROUPS)


def embedded_images(html: str) -> list[np.ndarray]:
    """Every PNG embedded in a page, as gray levels (ITU-R 601 luma)."""
    images = []
    for data in DATA_URI.findall(html):
        image = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
        images.append(np.asarray(image, dtype=np.float64))
    return images


def best_ssim_against_inputs(picture: np.ndarray, inputs: np.ndarray) -> float:
    """The highest SSIM (either way round, the SSIM range comes from the first image) between a
    picture resized to the inputs' size and any input image."""
    height, width = inputs.shape[1:]
    resized = Image.fromarray(picture.astype(np.float32)).resize((width, height), Image.BILINEAR)
    resized = np.asarray(resized, dtype=np.float64)
    if resized.std() == 0:
        return -1.0  # a flat picture shows nothing
    return max(max(ssim(image, resized), ssim(resized, image)) for image in inputs)


def test_anonymised_report_shows_nothing_of_anyone(result, tmp_path, capsys):
    train_keys, train = load_images(TRAIN)
    generated_keys, generated = load_images(GENERATED)
    inputs = np.concatenate([train, generated])

    # the check is not blind: the ordinary report shows the patients' images
    plain = result.save(tmp_path / "plain", gallery_size=2)["report"].read_text()
    assert max(best_ssim_against_inputs(p, inputs) for p in embedded_images(plain)) > 0.95

    files = result.save(tmp_path / "shared", anonymise=True, hash_keys=True, progress=True)
    assert "report gallery" in capsys.readouterr().err  # the gallery has a progress bar
    html = files["report"].read_text()
    pictures = embedded_images(html)
    duplicates_shown = sum(
        int(result.classes[i]) == 2 for i in np.argsort(-result.decision_scores[:, 0])[:24]
    )
    assert len(pictures) == 1 + duplicates_shown  # the histogram and one block map per Duplicate
    for picture in pictures:
        assert best_ssim_against_inputs(picture, inputs) < 0.3

    text = DATA_URI.sub("", html)  # base64 may spell anything
    for path in (REPO, EXAMPLE.resolve(), tmp_path, os.path.expanduser("~")):
        assert str(path) not in text
    assert "Traceback" not in text
    groups = {row["group"] for row in result.groups}
    for secret in [*train_keys, *generated_keys, *groups]:
        assert secret not in text, secret
    # the same key always gives the same hash, reproducible with the salt kept in the folder
    salt = (tmp_path / "shared" / "key-salt.txt").read_text().strip()
    hashed = key_hasher(salt)
    shown = set(re.findall(r"h:[0-9a-f]{16}", text))
    assert shown and shown <= {hashed(key) for key in [*train_keys, *generated_keys, *groups]}
    best = result.train_keys[result.neighbours[np.argmax(result.decision_scores[:, 0]), 0]]
    assert hashed(best) in text

    # without hashing the keys stay, the paths still go
    html = result.save(tmp_path / "keys", anonymise=True)["report"].read_text()
    text = DATA_URI.sub("", html)
    assert str(EXAMPLE.resolve()) not in text and str(tmp_path) not in text
    assert "gen_copy_0" in text and not (tmp_path / "keys" / "key-salt.txt").exists()
    with pytest.raises(DeepSSIMError, match="--anonymise"):
        result.save(tmp_path / "hash-only", hash_keys=True)


def test_release_folder_names_no_training_image(tmp_path, capsys):
    out, released = tmp_path / "scan", tmp_path / "release"
    command = ["scan", "--train", str(TRAIN), "--generated", str(GENERATED), "--out", str(out)]
    assert main([*command, "--no-cache", "--no-progress", "--release-dir", str(released)]) == 0
    train_keys, _ = load_images(TRAIN)
    secrets = [*train_keys, *(p.name for p in TRAIN.iterdir()), "nearest_train_key"]
    files = [p for p in released.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"release.csv", "release.json"}
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret not in path.name and secret.encode() not in content, (path, secret)
    with open(released / "release.csv", newline="") as handle:
        assert list(csv.DictReader(handle))[0].keys() == {
            "generated_key",
            "class",
            "released",
            "file",
            "reason",
        }
    # the manifest that names them is in the scan's folder, beside the other tables that do
    with open(out / "release.csv", newline="") as handle:
        manifest = {row["generated_key"]: row for row in csv.DictReader(handle)}
    assert manifest["gen_copy_0"]["nearest_train_key"] == "kmeans_t1_z22"
    assert f"{out / 'release.csv'} says why" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_scan_folder_is_complete_or_absent(result, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "groups.csv").write_text("stale")
    with pytest.raises(DeepSSIMError, match="holds no scan output"):  # not a scan's folder: kept
        result.save(out, overwrite=True)
    (out / "results.csv").write_text("stale")
    with pytest.raises(DeepSSIMError, match="--overwrite"):
        result.save(out)
    assert (out / "groups.csv").read_text() == "stale"
    result.save(out, report=False, overwrite=True)  # replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["groups.csv", "pairs.csv", "results.csv", "summary.json"]
    assert (out / "groups.csv").read_text() != "stale"
    (out / "notes.txt").write_text("stale")
    result.save(out, report=False, overwrite=True)
    assert not (out / "notes.txt").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        result.save(out, overwrite=True)
    assert not (tmp_path / "new").exists()  # nothing that looks finished ...
    assert (out / "summary.json").is_file() and not (out / "report.html").exists()  # ... the old one kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no temporary folder

    # the command line: an interruption during the report exits 130 and leaves no --out folder
    command = ["scan", "--train", str(TRAIN), "--generated", str(GENERATED), "--metric", "ssim"]
    command += ["--decision", "score", "--no-cache", "--no-progress", "--out", str(tmp_path / "cli")]
    assert main(command) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_never_inside_inputs(result, tmp_path):
    inside = TRAIN / "out"
    with pytest.raises(DeepSSIMError, match="inside the input"):
        result.save(inside)
    assert not inside.exists()
    with pytest.raises(DeepSSIMError, match="inside"):
        result.save(EXAMPLE, overwrite=True)  # would replace the inputs themselves
    with pytest.raises(DeepSSIMError, match="must not be inside one another"):
        result.save(tmp_path / "out", release_dir=tmp_path / "out" / "release")
    assert not list(tmp_path.iterdir())


def test_gallery_maps_are_drawn_small(result):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1000, 600))
    small = downsample(image)
    assert small.shape == (250, 150)
    np.testing.assert_allclose(small[0, 0], image[:4, :4].mean())
    assert downsample(image[:256, :200]).shape == (256, 200)  # small enough already
    blocks = block_difference(image, image[::-1])
    z = (image - image.mean()) / image.std()
    np.testing.assert_allclose(blocks[0, 0], np.abs(z - z[::-1])[:125, :75].mean())
    assert blocks.shape == (8, 8)
    for pair in gallery_pairs(result, 3):
        assert max(pair.train.shape) <= 256 and [label for label, _, _ in pair.maps] == [
            "difference",
            "similarity lost",
            "local SSIM",
        ]
    anonymous = gallery_pairs(result, 24, anonymise=True)
    assert all(pair.train is None and pair.generated is None and pair.aligned is None for pair in anonymous)
    assert {len(pair.maps) for pair in anonymous} == {0, 1}
